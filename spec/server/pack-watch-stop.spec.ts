/**
 * Stopping the background pack watcher (`ServiceDirectory.watchSubscriptions`) while a look is
 * loading a version: the stop's promise resolves once that look is over, and the look neither
 * warms the workers nor logs `pack warmed in background` / `background pack warm failed` after
 * it (on shutdown, the process's dependencies close right after).
 */
import { expect } from 'chai';
import type { CompiledPack } from '../../rules/index.ts';
import { packHash } from '../../rules/index.ts';
import { createLogger } from '../../server/logger.ts';
import { ServiceDirectory } from '../../server/service-directory.ts';
import type { ControlPlane, StoredPack } from '../../tenants/index.ts';
import { slowPack } from '../helpers/slow-pack.ts';

const ID = 'watch-stop';
const LOOK_MS = 5;

/**
 * A watcher over a control plane whose read of the subscribed version waits until the spec
 * lets it answer (`release`), with the pack or (`fail`) an error.
 */
function watch(fail: boolean) {
  const raw = slowPack(0, 1, ID);
  let release: () => void = () => undefined;
  const gate = new Promise<void>((resolve) => {
    release = resolve;
  });
  const seen = { reads: 0, warmed: [] as string[] };
  const controlPlane = {
    tenants: { subscribedVersions: () => Promise.resolve([[ID, '1.0.0']] as const) },
    packs: {
      get: async (id: string, version: string): Promise<StoredPack> => {
        seen.reads += 1;
        await gate;
        if (fail) {
          throw new Error('cannot read pack row');
        }
        return { id, version, hash: packHash(raw), pack: raw, uploadedAt: '2026-01-01' };
      },
    },
  } as unknown as ControlPlane;
  const lines: string[] = [];
  const log = createLogger({
    level: 'info',
    destination: { write: (l: string) => lines.push(l) },
  });
  const evaluator = { warm: (p: CompiledPack) => seen.warmed.push(`${p.id}@${p.version}`) };
  const directory = new ServiceDirectory(controlPlane);
  const stop = directory.watchSubscriptions(evaluator, log, LOOK_MS);
  const watcherLines = () =>
    lines.filter((l) => /pack warmed in background|background pack warm failed/.test(l));
  return { seen, stop, release, watcherLines };
}

async function until(what: string, done: () => boolean, ms = 10_000): Promise<void> {
  const deadline = Date.now() + ms;
  while (!done()) {
    expect(Date.now(), `timed out waiting for ${what}`).to.be.below(deadline);
    await new Promise((r) => setTimeout(r, 2));
  }
}

describe('background pack watcher: stopped during a look', function () {
  this.timeout(30_000);

  for (const fail of [false, true]) {
    it(`waits for the look in flight, which then logs nothing (the read ${fail ? 'fails' : 'succeeds'})`, async () => {
      const w = watch(fail);
      await until('the look reading the version', () => w.seen.reads > 0);
      // Stopped while the look waits for the pack row (as main.ts's close() may).
      const stopping = Promise.resolve(w.stop());
      let stopped = false;
      void stopping.then(() => {
        stopped = true;
      });
      await new Promise((r) => setTimeout(r, 50));
      expect(stopped, 'stop() resolved before the look in flight ended').to.equal(false);
      w.release();
      await stopping;
      // Whatever the look did, it did before stop() resolved; nothing comes after.
      const atStop = w.watcherLines().length;
      const warmedAtStop = w.seen.warmed.length;
      await new Promise((r) => setTimeout(r, 300));
      expect(w.watcherLines().slice(atStop), 'logged after stop() resolved').to.deep.equal([]);
      expect(w.seen.warmed.length, 'warmed after stop() resolved').to.equal(warmedAtStop);
      // A look stopped midway warms and logs nothing at all.
      expect(w.watcherLines()).to.deep.equal([]);
      expect(w.seen.warmed).to.deep.equal([]);
      expect(w.seen.reads, 'no look after stop()').to.equal(1);
    });
  }
});
