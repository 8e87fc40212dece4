/**
 * Two processes (replicas) on one store and one keyring: what one process caches (its DEKs, its
 * primary hint) must never let it seal a record the store cannot open, or under a key that was
 * meant to be destroyed.
 *
 * - A DEK version number is reused after a deprovision + re-provision (the store starts again at
 *   version 1) or a restore + rotation: a process that cached the old key of that number must
 *   not keep sealing (or reading) with it.
 * - PostgreSQL: a rotation by one replica must not commit between another replica's check of the
 *   primary version and its commit (the rewrap job would destroy the version under it). Specs
 *   hold a write transaction open with a `pg_sleep` trigger while the other replica rotates.
 */
import { expect } from 'chai';
import { ConflictError } from '../../../tenants/index.ts';
import { createLocalKeyProvider, tenantSchemaName } from '../../../tenants/data-plane.ts';
import type { JobInfo, RegionStores } from '../../../tenants/data-plane.ts';
import { PG_URL, forEachBackend, invocation, makeEnv } from './helpers.ts';
import type { Env, RawDb } from './helpers.ts';

const sleep = (ms: number) =>
  new Promise<void>((resolve) => {
    setTimeout(resolve, ms);
  });

/** Another process on the same storage and keyring (its own key provider instance). */
async function replica(env: Env, extra: { maxOpen?: number } = {}): Promise<RegionStores> {
  const keyProvider = await createLocalKeyProvider({ keyDir: env.keyDir, region: env.region });
  return env.reopen({ keyProvider, ...extra });
}

async function rotated(stores: RegionStores, tenant: string, emergency = false): Promise<JobInfo> {
  const job = await stores.store(tenant).keys.rotate({ emergency });
  const done = await stores.waitForJob(job.id);
  expect(done.status, done.error).to.equal('done');
  return done;
}

/** Evicts `tenant`'s handle of a maxOpen: 1 region (its DEKs are parked, as the LRU does). */
async function evict(stores: RegionStores, id: string): Promise<void> {
  await stores.store('other').saveInvocation(invocation(id));
  await sleep(20); // the evicted handle closes in the background
}

forEachBackend(
  'tenants/ data plane: a DEK version number reused under another process',
  (backend) => {
    let env: Env;
    beforeEach(async () => {
      env = await makeEnv(backend);
    });
    afterEach(async () => {
      await env.close();
    });

    it('deprovision + re-provision: a process that cached the old v1 seals and reads with the new one', async () => {
      const a = env.stores;
      const b = await replica(env, { maxOpen: 1 });
      await a.store('acme').saveInvocation(invocation('inv-1'));
      await b.store('acme').saveInvocation(invocation('inv-2')); // b caches DEK v1
      await evict(b, 'o-1'); // ... and parks it
      await a.deprovisionTenant('acme');
      await a.provisionTenant('acme'); // a new tenant key and a new v1
      await a.store('acme').saveInvocation(invocation('inv-3'));

      const ack = await b.store('acme').saveInvocation(invocation('inv-4'));
      expect(ack.keyVersion).to.equal(1);
      expect((await a.store('acme').readInvocation('inv-4')).secret.context).to.deep.equal(
        invocation('inv-4').secret?.context,
      );
      // b's own reads of the new v1's records work too (its parked key was the old v1).
      expect((await b.store('acme').readInvocation('inv-3')).id).to.equal('inv-3');
      const c = await replica(env);
      for (const id of ['inv-3', 'inv-4']) {
        expect((await c.store('acme').readInvocation(id)).id).to.equal(id);
      }
    });

    it('restore + rotate: a process that cached the old v2 seals and reads with the new v2', async () => {
      const a = env.stores;
      const b = await replica(env, { maxOpen: 1 });
      await a.store('acme').saveInvocation(invocation('inv-1'));
      const backup = await a.backupTenant('acme', env.backupDir); // v1 only
      await rotated(a, 'acme');
      await b.store('acme').saveInvocation(invocation('inv-2')); // b caches DEK v2
      await evict(b, 'o-1');
      await a.restoreTenant(backup.path);
      await rotated(a, 'acme'); // another v2; inv-1 moves to it, v1 is destroyed

      const ack = await b.store('acme').saveInvocation(invocation('inv-3'));
      expect(ack.keyVersion).to.equal(2);
      expect((await a.store('acme').readInvocation('inv-3')).id).to.equal('inv-3');
      expect((await b.store('acme').readInvocation('inv-1')).keyVersion).to.equal(2);
      const c = await replica(env);
      for (const id of ['inv-1', 'inv-3']) {
        expect((await c.store('acme').readInvocation(id)).id).to.equal(id);
      }
    });
  },
);

/** Runs a `pg_sleep` after every INSERT statement on `table` of the tenant's schema. */
async function slowInserts(env: Env, raw: RawDb, table: string, seconds: number): Promise<void> {
  const schema = tenantSchemaName(env.schemaPrefix, 'acme');
  await raw.exec(
    `CREATE OR REPLACE FUNCTION "${schema}".spec_slow() RETURNS trigger LANGUAGE plpgsql AS
     $$ BEGIN PERFORM pg_sleep(${String(seconds)}); RETURN NULL; END $$`,
  );
  await raw.exec(
    `CREATE TRIGGER spec_slow AFTER INSERT ON ${raw.t(table)}
     FOR EACH STATEMENT EXECUTE FUNCTION "${schema}".spec_slow()`,
  );
}

async function fastInserts(raw: RawDb, table: string): Promise<void> {
  await raw.exec(`DROP TRIGGER IF EXISTS spec_slow ON ${raw.t(table)}`);
}

/** Waits until some session is inside the slow trigger on the tenant's schema. */
async function untilSleeping(env: Env, raw: RawDb): Promise<void> {
  const schema = tenantSchemaName(env.schemaPrefix, 'acme');
  for (let i = 0; i < 1000; i += 1) {
    const [row] = await raw.query<{ n: number }>(
      `SELECT count(*)::int AS n FROM pg_stat_activity
       WHERE wait_event = 'PgSleep' AND position(:schema in query) > 0`,
      { schema },
    );
    if ((row?.n ?? 0) > 0) {
      return;
    }
    await sleep(5);
  }
  throw new Error('no write reached the slow trigger');
}

if (PG_URL) {
  describe('tenants/ data plane: replicas on one PostgreSQL database', () => {
    let env: Env;
    let raw: RawDb;
    beforeEach(async () => {
      env = await makeEnv('postgres');
      raw = await env.raw('acme');
    });
    afterEach(async () => {
      await env.close();
    });

    it('a hook write in flight during another replica’s rotation stays readable', async () => {
      const a = env.stores;
      const b = await replica(env);
      await a.store('acme').saveInvocation(invocation('inv-1'));
      await b.store('acme').saveInvocation(invocation('inv-2'));
      await slowInserts(env, raw, 'invocations', 0.5);
      const write = b.store('acme').saveInvocation(invocation('inv-3')); // checked v1, then sleeps
      await untilSleeping(env, raw);
      await rotated(a, 'acme');
      const ack = await write;
      await fastInserts(raw, 'invocations');
      expect(ack.id).to.equal('inv-3');
      for (const id of ['inv-1', 'inv-2', 'inv-3']) {
        expect((await a.store('acme').readInvocation(id)).keyVersion, id).to.equal(2);
      }
      const status = await a.store('acme').keys.status();
      expect(status.versions.map((v) => [v.version, v.status, v.records])).to.deep.equal([
        [1, 'destroyed', 0],
        [2, 'primary', 3],
      ]);
    });

    it('feedback in flight during another replica’s rotation stays readable', async () => {
      const a = env.stores;
      const b = await replica(env);
      await a.store('acme').saveInvocation(invocation('inv-1'));
      await b.store('acme').saveInvocation(invocation('inv-2'));
      await slowInserts(env, raw, 'feedback', 0.5);
      const saved = b
        .store('acme')
        .saveFeedback(
          [{ card: 'card-inv-1', outcome: 'accepted', outcomeTimestamp: '2025-01-01T12:05:00Z' }],
          { service: 'med-safety' },
        );
      await untilSleeping(env, raw);
      await rotated(a, 'acme');
      expect((await saved).stored).to.equal(1);
      await fastInserts(raw, 'feedback');
      const rec = await a.store('acme').readInvocation('inv-1');
      expect(rec.feedback.map((f) => [f.card, f.keyVersion])).to.deep.equal([['card-inv-1', 2]]);
    });

    it('a rewrap batch in flight during another replica’s emergency rotation stays readable', async () => {
      const a = env.stores;
      const b = await replica(env);
      for (let i = 1; i <= 5; i += 1) {
        await a.store('acme').saveInvocation(invocation(`inv-${i}`));
      }
      // b's scheduled job writes its first batch of heads (under v2), then sleeps in it.
      await slowInserts(env, raw, 'invocation_heads', 0.8);
      const first = await b.store('acme').keys.rotate();
      await untilSleeping(env, raw);
      const second = await a.store('acme').keys.rotate({ emergency: true });
      expect((await a.waitForJob(second.id)).status).to.equal('done');
      expect((await b.waitForJob(first.id)).status).to.be.oneOf(['superseded', 'done']);
      // Only now: DROP TRIGGER waits for b's transaction and queues every reader behind it.
      await fastInserts(raw, 'invocation_heads');
      const c = await replica(env);
      for (let i = 1; i <= 5; i += 1) {
        expect((await c.store('acme').readInvocation(`inv-${i}`)).keyVersion).to.equal(3);
      }
    });

    it('a replica with an open handle seals under the re-provisioned v1, not its cached one', async () => {
      const a = env.stores;
      const b = await replica(env);
      await a.store('acme').saveInvocation(invocation('inv-1'));
      await b.store('acme').saveInvocation(invocation('inv-2'));
      await a.deprovisionTenant('acme');
      await a.provisionTenant('acme');
      await a.store('acme').saveInvocation(invocation('inv-3'));
      const ack = await b.store('acme').saveInvocation(invocation('inv-4'));
      expect(ack.keyVersion).to.equal(1);
      expect((await a.store('acme').readInvocation('inv-4')).id).to.equal('inv-4');
      expect((await b.store('acme').readInvocation('inv-3')).id).to.equal('inv-3');
      const c = await replica(env);
      expect((await c.store('acme').readInvocation('inv-4')).id).to.equal('inv-4');
    });

    it('a replica with an open handle seals under the v2 of a restore + rotate, not its cached one', async () => {
      const a = env.stores;
      const b = await replica(env);
      await a.store('acme').saveInvocation(invocation('inv-1'));
      const backup = await a.backupTenant('acme', env.backupDir);
      await rotated(a, 'acme');
      await b.store('acme').saveInvocation(invocation('inv-2')); // b: hint and key of v2
      await a.restoreTenant(backup.path);
      await rotated(a, 'acme');
      const ack = await b.store('acme').saveInvocation(invocation('inv-3'));
      expect(ack.keyVersion).to.equal(2);
      expect((await a.store('acme').readInvocation('inv-3')).id).to.equal('inv-3');
      expect((await b.store('acme').readInvocation('inv-1')).id).to.equal('inv-1');
    });

    it('concurrent rotations on two replicas: each succeeds or is a ConflictError', async () => {
      const a = env.stores;
      const b = await replica(env);
      for (let i = 1; i <= 10; i += 1) {
        await a.store('acme').saveInvocation(invocation(`inv-${i}`));
      }
      for (const emergency of [false, true, true]) {
        const settled = await Promise.allSettled(
          [a, b].map((s) => s.store('acme').keys.rotate({ emergency })),
        );
        for (const [k, r] of settled.entries()) {
          if (r.status === 'rejected') {
            expect(r.reason, String(r.reason)).to.be.instanceOf(ConflictError);
            expect(emergency, 'an emergency rotation is never refused').to.equal(false);
          } else {
            await [a, b][k]?.waitForJob(r.value.id);
          }
        }
        expect(settled.some((r) => r.status === 'fulfilled')).to.equal(true);
      }
      const status = await a.store('acme').keys.status();
      expect(status.versions.filter((v) => v.status === 'primary')).to.have.length(1);
      expect((await a.store('acme').audit.verify()).ok).to.equal(true);
      for (let i = 1; i <= 10; i += 1) {
        expect((await a.store('acme').readInvocation(`inv-${i}`)).keyVersion).to.equal(
          status.primary,
        );
      }
    });

    it('writes and reads on one replica while the other rotates: none fails, all readable', async () => {
      const a = env.stores;
      const b = await replica(env);
      await a.store('acme').saveInvocation(invocation('inv-0'));
      await b.store('acme').saveInvocation(invocation('inv-00'));
      await slowInserts(env, raw, 'invocations', 0.25);
      const acked: string[] = [];
      for (let round = 1; round <= 3; round += 1) {
        const writes = Array.from({ length: 16 }, async (_, i) => {
          const id = `inv-${round}${String(i).padStart(2, '0')}`;
          await b.store('acme').saveInvocation(invocation(id));
          acked.push(id);
        });
        const reads = Array.from({ length: 6 }, () => b.store('acme').readInvocation('inv-0'));
        await sleep(5 * round);
        const job = await a.store('acme').keys.rotate({ emergency: round === 2 });
        await Promise.all([...writes, ...reads]);
        expect((await a.waitForJob(job.id)).status).to.equal('done');
      }
      await fastInserts(raw, 'invocations');
      expect(acked).to.have.length(48);
      for (const id of acked) {
        expect((await a.store('acme').readInvocation(id)).keyVersion, id).to.equal(4);
      }
    });
    it('store sessions end when idle in a transaction past 10 s; writes run at READ COMMITTED', async () => {
      // A replica cut off mid-write must not hold the primary DEK row (every write of the
      // store waits on it) until TCP keepalive notices: the server ends the session.
      const schema = tenantSchemaName(env.schemaPrefix, 'acme');
      await env.stores.store('acme').saveInvocation(invocation('inv-0'));
      await raw.exec(`CREATE TABLE "${schema}".spec_seen (idle text, iso text)`);
      await raw.exec(
        `CREATE OR REPLACE FUNCTION "${schema}".spec_seen() RETURNS trigger LANGUAGE plpgsql AS
         $$ BEGIN
           INSERT INTO "${schema}".spec_seen VALUES (
             current_setting('idle_in_transaction_session_timeout'),
             current_setting('transaction_isolation'));
           RETURN NULL;
         END $$`,
      );
      await raw.exec(
        `CREATE TRIGGER spec_seen AFTER INSERT ON ${raw.t('invocations')}
         FOR EACH STATEMENT EXECUTE FUNCTION "${schema}".spec_seen()`,
      );
      const u = new URL(PG_URL ?? '');
      u.searchParams.set('options', '-c default_transaction_isolation=repeatable\\ read');
      const keyProvider = await createLocalKeyProvider({ keyDir: env.keyDir, region: env.region });
      const b = await env.reopen({ keyProvider, postgresUrl: u.toString() });
      await b.store('acme').saveInvocation(invocation('inv-1'));
      expect(await raw.query(`SELECT idle, iso FROM "${schema}".spec_seen`)).to.deep.equal([
        { idle: '10s', iso: 'read committed' },
      ]);
    });

    it('a replica whose sessions default to REPEATABLE READ writes while the other rotates', async () => {
      // ALTER ROLE ... SET default_transaction_isolation (here the URL's options): write
      // transactions lock, then read the primary DEK row; only READ COMMITTED reads the row
      // another replica committed meanwhile (else 40001, "could not serialize access").
      const u = new URL(PG_URL ?? '');
      u.searchParams.set('options', '-c default_transaction_isolation=repeatable\\ read');
      const keyProvider = await createLocalKeyProvider({ keyDir: env.keyDir, region: env.region });
      const a = env.stores;
      const b = await env.reopen({ keyProvider, postgresUrl: u.toString() });
      await a.store('acme').saveInvocation(invocation('inv-0'));
      await b.store('acme').saveInvocation(invocation('inv-00'));
      const acked: string[] = [];
      for (let round = 1; round <= 3; round += 1) {
        const writes = Array.from({ length: 16 }, async (_, i) => {
          const id = `inv-${String(round)}${String(i).padStart(2, '0')}`;
          await b.store('acme').saveInvocation(invocation(id));
          acked.push(id);
        });
        await sleep(2 * round);
        const job = await a.store('acme').keys.rotate();
        await Promise.all(writes);
        expect((await a.waitForJob(job.id)).status).to.equal('done');
      }
      expect(acked).to.have.length(48);
      for (const id of acked) {
        expect((await a.store('acme').readInvocation(id)).keyVersion, id).to.equal(4);
      }
    });
  });
}
