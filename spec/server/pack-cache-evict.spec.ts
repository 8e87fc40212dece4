/**
 * The service directory keeps a compiled pack version only while it is needed: versions an
 * active tenant subscribes to (pinned or canary) stay compiled; any other version (a replay of
 * an old record, a version unsubscribed since) is dropped once it has not been used for the
 * idle time, so the process does not keep every version it ever compiled for its lifetime.
 * A real control plane (SQLite) behind a test app; the directory's reads of it are counted.
 */
import { expect } from 'chai';
import { createLogger } from '../../server/logger.ts';
import { ServiceDirectory } from '../../server/service-directory.ts';
import { tinyPack } from '../helpers/packs.ts';
import { buildTestApp, type TestApp } from '../helpers/test-app.ts';

const LOOK_MS = 5;

describe('server/ compiled pack versions are dropped when idle and not subscribed', function () {
  this.timeout(30_000);
  let t: TestApp;
  const reads: string[] = [];
  const quiet = createLogger({ level: 'silent' });

  before(async () => {
    t = await buildTestApp();
    for (const version of ['1.0.0', '1.1.0']) {
      expect((await t.uploadPack(tinyPack('evict', version))).status).to.equal(201);
    }
    await t.addTenant('hosp-a', { subscriptions: [{ pack: 'evict', version: '1.1.0' }] });
    const packs = t.deps.controlPlane.packs;
    const get = packs.get.bind(packs);
    packs.get = (id: string, version: string) => {
      reads.push(`${id}@${version}`);
      return get(id, version);
    };
  });
  after(async () => t.close());

  const count = (key: string) => reads.filter((r) => r === key).length;
  const wait = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

  it('drops an idle version nobody subscribes to, keeps the subscribed one', async () => {
    reads.length = 0;
    const directory = new ServiceDirectory(t.deps.controlPlane, { idleEvictMs: 50 });
    const stop = directory.watchSubscriptions({ warm: () => undefined }, quiet, LOOK_MS);
    try {
      await directory.pack('evict', '1.0.0'); // e.g. a replay of a record made with 1.0.0
      await directory.pack('evict', '1.1.0');
      await wait(300);
      await directory.pack('evict', '1.0.0');
      await directory.pack('evict', '1.1.0');
    } finally {
      await stop();
    }
    expect(count('evict@1.0.0'), 'the idle, unsubscribed version is read again').to.equal(2);
    expect(count('evict@1.1.0'), 'the subscribed version stays compiled').to.equal(1);
  });

  it('keeps a version used within the idle time', async () => {
    reads.length = 0;
    const directory = new ServiceDirectory(t.deps.controlPlane, { idleEvictMs: 60_000 });
    const stop = directory.watchSubscriptions({ warm: () => undefined }, quiet, LOOK_MS);
    try {
      await directory.pack('evict', '1.0.0');
      await wait(100);
      await directory.pack('evict', '1.0.0');
    } finally {
      await stop();
    }
    expect(count('evict@1.0.0')).to.equal(1);
  });
});
