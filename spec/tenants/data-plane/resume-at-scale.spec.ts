/**
 * Boot of a PostgreSQL region with many tenants (scale-out review, finding 1): the scan for
 * rotations left `running` must not keep every store (and its pooled connection) open, a store
 * that cannot be opened must not stop the boot (it is reported and retried), and a connection
 * refused by the server is never mistaken for a missing store. A throwaway TCP proxy caps or
 * refuses connections the way a full `max_connections` does; the real server is not touched.
 */
import { expect } from 'chai';
import { NotFoundError } from '../../../tenants/index.ts';
import { createLocalKeyProvider } from '../../../tenants/data-plane.ts';
import type { RegionStores } from '../../../tenants/data-plane.ts';
import { PG_URL, invocation, makeEnv, rejection } from './helpers.ts';
import type { Env } from './helpers.ts';
import { startTcpProxy } from './tcp-proxy.ts';
import type { TcpProxy } from './tcp-proxy.ts';

const TENANTS = 12;
const sleep = (ms: number) =>
  new Promise<void>((resolve) => {
    setTimeout(resolve, ms);
  });

(PG_URL ? describe : describe.skip)(
  'tenants/ data plane: resuming jobs at boot with many tenants [postgres]',
  () => {
    let env: Env;
    let proxy: TcpProxy;
    let jobId: string;
    const errors: Array<{ tenant: string | undefined; err: unknown }> = [];

    const replica = async (): Promise<RegionStores> =>
      env.reopen({
        postgresUrl: proxy.url,
        keyProvider: await createLocalKeyProvider({ keyDir: env.keyDir, region: env.region }),
        resumeRetryMs: 100,
        onResumeError: (tenant, err) => {
          errors.push({ tenant, err });
        },
      });

    beforeEach(async () => {
      errors.length = 0;
      // One record per scheduled batch, a minute between batches: the job stays `running`.
      env = await makeEnv('postgres', {
        stores: { rewrap: { batchSize: 1, scheduledBatchSize: 1, throttleMs: 60_000 } },
      });
      for (let i = 0; i < TENANTS; i += 1) {
        await env.stores.store(`t-${String(i)}`).saveInvocation(invocation(`inv-${String(i)}`));
      }
      const busy = env.stores.store('busy');
      await busy.saveInvocation(invocation('b-1'));
      await busy.saveInvocation(invocation('b-2'));
      await busy.saveInvocation(invocation('b-3'));
      jobId = (await busy.keys.rotate()).id;
      await env.stores.close(); // the job stays `running` in the store
      proxy = await startTcpProxy(PG_URL ?? '');
    });
    afterEach(async () => {
      await env.close();
      await proxy.close();
    });

    it('scans every store without keeping them open, and resumes the pending job', async () => {
      // The region connection, the running job's store and one store being scanned (+1 slack
      // for a closed connection the proxy has not seen go yet).
      proxy.maxConns = 5;
      const stores = await replica();
      const started = await stores.resumePendingJobs();
      expect(started.map((j) => j.id)).to.deep.equal([jobId]);
      expect(errors).to.deep.equal([]);
      expect(stores.stats().open).to.be.at.most(2);
      expect(stores.stats().runningJobs).to.equal(1);
    });

    it('a store that cannot be opened is reported and retried; the boot goes on', async () => {
      proxy.maxConns = 1; // the region connection only: every store open is refused
      const stores = await replica();
      const started = await stores.resumePendingJobs();
      expect(started).to.deep.equal([]);
      expect(errors.length).to.be.greaterThan(0);
      for (const { err } of errors) {
        expect(err).not.to.be.instanceOf(NotFoundError);
      }
      proxy.maxConns = Number.POSITIVE_INFINITY;
      for (let i = 0; i < 100 && stores.stats().runningJobs === 0; i += 1) {
        await sleep(50);
      }
      expect(stores.stats().runningJobs).to.equal(1);
      expect((await stores.findJob(jobId))?.status).to.equal('running');
    });

    it('a refused connection is not reported as a missing store', async () => {
      proxy.maxConns = 1;
      const stores = await replica();
      const err = await rejection(stores.listJobs('t-1'));
      expect(err).not.to.be.instanceOf(NotFoundError);
    });
  },
);
