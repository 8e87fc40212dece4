/**
 * A child process for the local keyring crash specs (spawned with `node --import tsx`). Modes:
 * - `loop`: creates tenant keys `<prefix><n>` forever; prints `ready` after the first.
 * - `hang-in-write`: creates `count` tenant keys, then starts one more write and hangs inside
 *   it, after the temp file is written and fsynced and before it is renamed over the keyring
 *   (so while holding the keyring lock); prints `holding` once there. The spec SIGKILLs it.
 * - `contend`: creates `count` tenant keys one after another. Each write sleeps `holdMs` before
 *   its rename (a wider critical section, so an overlap would lose an update) and prints
 *   `enter <ms>` when it creates its temp file and `exit <ms>` after the rename (wall-clock ms,
 *   comparable across processes), then `done`; on error `error <reason>` and exit code 1.
 * With `goFile`, a worker prints `waiting` and opens the keyring only once that file exists (and
 * prints `start <ms>`), so that several workers meet the keyring's state at the same moment.
 */
import fs from 'node:fs';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import {
  KeyUnavailableError,
  createLocalKeyProvider,
  keyringPath,
} from '../../../../tenants/data-plane.ts';

interface WorkerArgs {
  mode: 'loop' | 'hang-in-write' | 'contend';
  keyDir: string;
  region: string;
  prefix: string;
  count?: number;
  holdMs?: number;
  goFile?: string;
}

const args = JSON.parse(process.argv[2] ?? '{}') as WorkerArgs;
const file = keyringPath(args.keyDir, args.region);
const tmpPrefix = `${path.basename(file)}.tmp-`;

/** Synchronous, so a line is out before the process hangs or is killed. */
function say(line: string): void {
  fs.writeSync(1, `${line}\n`);
}

function block(ms: number): void {
  Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, ms);
}

const wallMs = () => (performance.timeOrigin + performance.now()).toFixed(3);
const fsw = fs as { -readonly [K in keyof typeof fs]: (typeof fs)[K] };
const { openSync, renameSync } = fs;

if (args.goFile !== undefined) {
  say('waiting');
  while (!fs.existsSync(args.goFile)) {
    await new Promise((r) => setTimeout(r, 5));
  }
  say(`start ${wallMs()}`);
}
const provider = await createLocalKeyProvider({ keyDir: args.keyDir, region: args.region });
const count = args.count ?? 0;

try {
  switch (args.mode) {
    case 'loop':
      for (let i = 0; ; i++) {
        await provider.createTenantKey(`${args.prefix}${i}`);
        if (i === 0) {
          say('ready');
        }
      }
    case 'hang-in-write':
      for (let i = 0; i < count; i++) {
        await provider.createTenantKey(`${args.prefix}${i}`);
      }
      fsw.renameSync = (from, to) => {
        if (to === file) {
          say('holding');
          block(600_000);
        }
        renameSync(from, to);
      };
      await provider.createTenantKey(`${args.prefix}hang`);
      break;
    case 'contend':
      fsw.openSync = (p: fs.PathLike, flags: fs.OpenMode, mode?: fs.Mode | null) => {
        if (path.basename(String(p)).startsWith(tmpPrefix)) {
          say(`enter ${wallMs()}`);
        }
        return openSync(p, flags, mode);
      };
      fsw.renameSync = (from, to) => {
        if (to === file) {
          block(args.holdMs ?? 0);
          renameSync(from, to);
          say(`exit ${wallMs()}`);
          return;
        }
        renameSync(from, to);
      };
      for (let i = 0; i < count; i++) {
        await provider.createTenantKey(`${args.prefix}${i}`);
      }
      say('done');
      break;
  }
  process.exit(0);
} catch (err) {
  say(`error ${err instanceof KeyUnavailableError ? err.reason : String(err)}`);
  process.exit(1);
}
