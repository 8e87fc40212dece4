/**
 * A child process for the migration crash specs (spawned with `node --import tsx`): opens both
 * regions, runs `migrateTenant`, and SIGKILLs itself at `killAt` (after that phase's checkpoint,
 * or inside `commit` right after the commit marker is written, before the checkpoint).
 * Prints `phase <name>` after each checkpoint and `final <json>` if it is not killed.
 */
import fs from 'node:fs';
import {
  createLocalKeyProvider,
  migrateTenant,
  openRegionStores,
} from '../../../../tenants/data-plane.ts';
import type { MigrationRegion } from '../../../../tenants/data-plane.ts';
import type { ChildOptions } from '../helpers.ts';

interface WorkerArgs {
  source: ChildOptions;
  target: ChildOptions;
  tenant: string;
  stateDir: string;
  /** A phase name, or `commit`. */
  killAt: string;
  /** The commit marker file (stands in for the control plane's home region). */
  homeFile: string;
}

const args = JSON.parse(process.argv[2] ?? '{}') as WorkerArgs;

async function open(o: ChildOptions): Promise<MigrationRegion> {
  const keyProvider = await createLocalKeyProvider({ keyDir: o.keyDir, region: o.region });
  const stores = await openRegionStores({
    region: o.region,
    keyProvider,
    ...(o.dataDir !== undefined
      ? { dataDir: o.dataDir }
      : { postgresUrl: o.postgresUrl ?? '', schemaPrefix: o.schemaPrefix ?? '' }),
  });
  return { keyProvider, stores };
}

const source = await open(args.source);
const target = await open(args.target);
const result = await migrateTenant({
  tenant: args.tenant,
  source,
  target,
  stateDir: args.stateDir,
  actor: 'spec-child',
  commit() {
    fs.writeFileSync(args.homeFile, args.target.region);
    if (args.killAt === 'commit') {
      process.kill(process.pid, 'SIGKILL');
    }
    return Promise.resolve();
  },
  onProgress(p) {
    process.stdout.write(`phase ${p.phase}\n`);
    if (p.phase === args.killAt) {
      process.kill(process.pid, 'SIGKILL');
    }
  },
});
process.stdout.write(`final ${JSON.stringify(result)}\n`);
await source.stores.close();
await target.stores.close();
