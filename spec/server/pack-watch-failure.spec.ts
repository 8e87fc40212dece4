/**
 * The background pack watcher (`ServiceDirectory.watchSubscriptions`) when a subscribed version
 * cannot be loaded on this replica (here the control plane's read of it fails): it logs
 * `background pack warm failed` once, naming the pack and version and nothing else (no call
 * data, not even the error's message), does not try that version again on every look (one
 * look every few seconds on every replica), tries it again once the retry interval has passed,
 * and still warms the other subscribed versions meanwhile.
 */
import { expect } from 'chai';
import type { CompiledPack } from '../../rules/index.ts';
import { createLogger } from '../../server/logger.ts';
import { ServiceDirectory } from '../../server/service-directory.ts';
import type { ControlPlane } from '../../tenants/index.ts';
import { slowPack } from '../helpers/slow-pack.ts';
import { buildTestApp, type TestApp } from '../helpers/test-app.ts';

const GOOD = 'watch-good';
const BAD = 'watch-bad';
/** E-mail shaped after `watch-bad@`: the line must keep the id and the version apart. */
const BAD_VERSION = '1.0.0-rc.ab12';
/** What the failed read says; the log line must not repeat it. */
const SECRET = 'Jane Doe 1970-01-01 MRN 0012345';
const LOOK_MS = 20;

describe('background pack watcher: a subscribed version that fails to load', function () {
  this.timeout(60_000);
  let t: TestApp;

  before(async () => {
    t = await buildTestApp({ CELLCDS_SEED_DEMO: 'false' });
    const bad = { ...slowPack(0, 1, BAD), version: BAD_VERSION };
    for (const pack of [slowPack(0, 1, GOOD), bad]) {
      const up = await t.uploadPack(pack);
      expect(up.status, JSON.stringify(up.body)).to.equal(201);
    }
    await t.addTenant('watch-a', { subscriptions: [{ pack: GOOD, version: '1.0.0' }] });
    await t.addTenant('watch-b', { subscriptions: [{ pack: BAD, version: BAD_VERSION }] });
  });
  after(async () => t.close());

  /**
   * A directory on the app's control plane whose read of the bad version fails (as a pack row
   * this replica cannot read would): counts the watcher's looks and its reads of that version.
   */
  function watch(retryMs?: number) {
    const cp = t.deps.controlPlane;
    const seen = { looks: 0, badReads: [] as number[], warmed: [] as string[] };
    const controlPlane: ControlPlane = {
      ...cp,
      tenants: {
        ...cp.tenants,
        subscribedVersions: () => {
          seen.looks += 1;
          return cp.tenants.subscribedVersions();
        },
      },
      packs: {
        ...cp.packs,
        get: (id, version) => {
          if (id !== BAD) {
            return cp.packs.get(id, version);
          }
          seen.badReads.push(Date.now());
          return Promise.reject(new Error(`cannot read pack row: ${SECRET}`));
        },
      },
    };
    const lines: string[] = [];
    const log = createLogger({
      level: 'info',
      destination: { write: (l: string) => lines.push(l) },
    });
    const evaluator = { warm: (p: CompiledPack) => seen.warmed.push(`${p.id}@${p.version}`) };
    const directory = new ServiceDirectory(controlPlane);
    const stop =
      retryMs === undefined
        ? directory.watchSubscriptions(evaluator, log, LOOK_MS)
        : directory.watchSubscriptions(evaluator, log, LOOK_MS, retryMs);
    const failures = () =>
      lines
        .map((l) => JSON.parse(l) as Record<string, unknown>)
        .filter((l) => l.msg === 'background pack warm failed');
    return { seen, lines, failures, stop };
  }

  async function until(what: string, done: () => boolean, ms = 20_000): Promise<void> {
    const deadline = Date.now() + ms;
    while (!done()) {
      expect(Date.now(), `timed out waiting for ${what}`).to.be.below(deadline);
      await new Promise((r) => setTimeout(r, 10));
    }
  }

  it('logs the failure once, with pack and packVersion and no call data, and does not retry on every look', async () => {
    const w = watch();
    try {
      await until('the failure', () => w.failures().length > 0);
      const failedAtLook = w.seen.looks;
      // Many more looks, all well within the (default, 5 min) retry interval.
      await until('20 more looks', () => w.seen.looks >= failedAtLook + 20);
      expect(w.seen.badReads, 'reads of the failing version').to.have.length(1);
      expect(w.failures()).to.have.length(1);
      const line = w.failures()[0]!;
      expect(line).to.include({ level: 'warn', pack: BAD, packVersion: BAD_VERSION });
      // The error's name only, not its message.
      expect((line.error as { type: string }).type).to.equal('Error');
      const fields = Object.keys(line).filter(
        (k) => !['level', 'time', 'pid', 'hostname', 'app', 'msg'].includes(k),
      );
      expect(fields.sort()).to.deep.equal(['error', 'pack', 'packVersion']);
      expect(w.lines.join('\n')).to.not.include('Jane Doe').and.not.include('0012345');
      // The other subscribed version was warmed all the same.
      expect(w.seen.warmed).to.include(`${GOOD}@1.0.0`);
    } finally {
      await w.stop();
    }
  });

  it('tries the version again only once the retry interval has passed', async () => {
    const retryMs = 300;
    const w = watch(retryMs);
    try {
      await until('a second read', () => w.seen.badReads.length >= 2);
      const [first, second] = w.seen.badReads as [number, number];
      expect(second - first).to.be.at.least(retryMs);
      await until('its failure logged', () => w.failures().length >= 2);
      expect(w.failures()).to.have.length(w.seen.badReads.length);
    } finally {
      await w.stop();
    }
  });
});
