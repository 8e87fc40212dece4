/**
 * A child process for the crash specs (spawned with `node --import tsx`). Modes:
 * - `save`: saves one invocation, prints `ack <id>`, then idles until killed.
 * - `rewrap`: prints `owner <jobOwner>`, resumes pending jobs, prints
 *   `progress <done> <total> <status>` as the job advances, and `final <json>` when it stops
 *   running.
 */
import { createLocalKeyProvider, openRegionStores } from '../../../../tenants/data-plane.ts';
import { invocation } from '../helpers.ts';
import type { ChildOptions } from '../helpers.ts';

interface WorkerArgs {
  mode: 'save' | 'rewrap';
  env: ChildOptions;
  tenant: string;
  id?: string;
  jobId?: string;
  batchSize?: number;
  scheduledBatchSize?: number;
  throttleMs?: number;
  jobLeaseMs?: number;
}

const args = JSON.parse(process.argv[2] ?? '{}') as WorkerArgs;
const provider = await createLocalKeyProvider({ keyDir: args.env.keyDir, region: args.env.region });
const stores = await openRegionStores({
  region: args.env.region,
  keyProvider: provider,
  ...(args.env.dataDir !== undefined
    ? { dataDir: args.env.dataDir }
    : { postgresUrl: args.env.postgresUrl ?? '', schemaPrefix: args.env.schemaPrefix ?? '' }),
  rewrap: {
    batchSize: args.batchSize ?? 25,
    throttleMs: args.throttleMs ?? 0,
    ...(args.scheduledBatchSize !== undefined
      ? { scheduledBatchSize: args.scheduledBatchSize }
      : {}),
  },
  ...(args.jobLeaseMs !== undefined ? { jobLeaseMs: args.jobLeaseMs } : {}),
});

if (args.mode === 'save') {
  const id = args.id ?? 'acked';
  await stores.store(args.tenant).saveInvocation(invocation(id, `ACK${id}`));
  process.stdout.write(`ack ${id}\n`);
  setInterval(() => undefined, 1000);
} else {
  process.stdout.write(`owner ${stores.jobOwner}\n`);
  const resumed = await stores.resumePendingJobs();
  process.stdout.write(`resumed ${resumed.map((j) => j.id).join(',')}\n`);
  const jobId = args.jobId ?? '';
  let last = -1;
  for (;;) {
    const job = await stores.findJob(jobId);
    if (!job) {
      process.stdout.write('final missing\n');
      break;
    }
    if (job.done !== last) {
      last = job.done;
      process.stdout.write(`progress ${job.done} ${job.total} ${job.status}\n`);
    }
    if (job.status !== 'running') {
      process.stdout.write(`final ${JSON.stringify(job)}\n`);
      break;
    }
    await new Promise((r) => setTimeout(r, 5));
  }
  await stores.close();
  process.exit(0);
}
