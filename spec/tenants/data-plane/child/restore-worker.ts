/**
 * A child process for the restore crash spec (spawned with `node --import tsx`): opens the
 * region's SQLite stores as the server would and restores `backup` into `tenant`, SIGKILLing
 * itself at `point` of the restore's file operations (the restore code calls `fs` through the
 * module object, so wrapping its functions here sees every call):
 * - `copied`: right after the staged copy is written, before it is checked or committed;
 * - `before-wal-removal`: just before the live store's `-wal` file is removed;
 * - `before-rename`: just before the staged copy is renamed onto the live store;
 * - `after-rename`: right after that rename.
 * Prints `restored` and exits 0 if the point is never reached.
 */
import fs from 'node:fs';
import path from 'node:path';
import { createLocalKeyProvider, openRegionStores } from '../../../../tenants/data-plane.ts';
import type { ChildOptions } from '../helpers.ts';

export type CrashPoint = 'copied' | 'before-wal-removal' | 'before-rename' | 'after-rename';

interface WorkerArgs {
  env: ChildOptions;
  tenant: string;
  backup: string;
  point: CrashPoint;
}

const args = JSON.parse(process.argv[2] ?? '{}') as WorkerArgs;
const dir = path.join(path.resolve(args.env.dataDir ?? ''), args.env.region);
const live = path.join(dir, `${args.tenant}.sqlite`);
const stagedPrefix = path.join(dir, `.${args.tenant}.restore-`);

function die(): never {
  process.kill(process.pid, 'SIGKILL');
  throw new Error('unreachable');
}

const { copyFileSync, rmSync, renameSync } = fs;
Object.assign(fs, {
  copyFileSync(src: fs.PathLike, dest: fs.PathLike, mode?: number) {
    copyFileSync(src, dest, mode);
    if (args.point === 'copied' && String(dest).startsWith(stagedPrefix)) {
      die();
    }
  },
  rmSync(p: fs.PathLike, opts?: fs.RmOptions) {
    if (args.point === 'before-wal-removal' && String(p) === `${live}-wal`) {
      die();
    }
    rmSync(p, opts);
  },
  renameSync(from: fs.PathLike, to: fs.PathLike) {
    if (args.point === 'before-rename' && String(to) === live) {
      die();
    }
    renameSync(from, to);
    if (args.point === 'after-rename' && String(to) === live) {
      die();
    }
  },
});

const provider = await createLocalKeyProvider({ keyDir: args.env.keyDir, region: args.env.region });
const stores = await openRegionStores({
  region: args.env.region,
  keyProvider: provider,
  dataDir: args.env.dataDir ?? '',
});
await stores.restoreTenant(args.backup, { tenant: args.tenant });
process.stdout.write('restored\n');
await stores.close();
process.exit(0);
