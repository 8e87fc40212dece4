/**
 * First calls for a new tenant arriving on two replicas at once (scale-out review, finding 2):
 * both create the tenant's schema, tables and DEK v1 at the same moment. Every call must
 * succeed, the store must end up with one DEK v1 (one `key.create` event), and each replica
 * must read what the other wrote.
 */
import { expect } from 'chai';
import { createLocalKeyProvider } from '../../../tenants/data-plane.ts';
import type { RegionStores } from '../../../tenants/data-plane.ts';
import { PG_URL, invocation, makeEnv } from './helpers.ts';
import type { Env } from './helpers.ts';

(PG_URL ? describe : describe.skip)(
  'tenants/ data plane: a new tenant created by two replicas at once [postgres]',
  () => {
    let env: Env;
    let other: RegionStores;
    beforeEach(async () => {
      env = await makeEnv('postgres');
      other = await env.reopen({
        keyProvider: await createLocalKeyProvider({ keyDir: env.keyDir, region: env.region }),
      });
    });
    afterEach(async () => {
      await env.close();
    });

    it('every first call succeeds; one DEK v1 and one key.create per tenant', async () => {
      const tenants = Array.from({ length: 8 }, (_, i) => `new-${String(i)}`);
      const calls = tenants.flatMap((t) =>
        [env.stores, other, env.stores, other].map((s, j) =>
          s.store(t).saveInvocation(invocation(`${t}-${String(j)}`)),
        ),
      );
      const results = await Promise.allSettled(calls);
      const failed = results.flatMap((r) => (r.status === 'rejected' ? [String(r.reason)] : []));
      expect(failed).to.deep.equal([]);
      for (const t of tenants) {
        const db = await env.raw(t);
        try {
          const deks = await db.query<{ version: number }>(
            `SELECT version FROM ${db.t('dek_versions')}`,
          );
          expect(deks.map((d) => d.version)).to.deep.equal([1]);
          const created = await db.query(
            `SELECT seq FROM ${db.t('audit_events')} WHERE type = 'key.create'`,
          );
          expect(created).to.have.length(1);
        } finally {
          await db.close();
        }
        for (const s of [env.stores, other]) {
          for (let j = 0; j < 4; j += 1) {
            const rec = await s.store(t).readInvocation(`${t}-${String(j)}`);
            expect(rec.id).to.equal(`${t}-${String(j)}`);
          }
          expect((await s.store(t).audit.verify()).ok).to.equal(true);
        }
      }
    });
  },
);
