/**
 * Retention: `purgeRecords({ before })` deletes the invocation records older than the cutoff with
 * their feedback, card links and head rows, in batches, leaves newer records readable, appends
 * one `records.purged` event (cutoff and counts, no PHI) and keeps the audit chain verifiable.
 * It stays correct beside a rewrap job, backups and another process purging the same tenant.
 */
import { expect } from 'chai';
import { InvalidInputError, NotFoundError } from '../../../tenants/errors.ts';
import type { FeedbackInput, PurgeProgress, PurgeResult } from '../../../tenants/data-plane.ts';
import { asInstance, forEachBackend, invocation, makeEnv, rejection } from './helpers.ts';
import type { Env } from './helpers.ts';

const SERVICE = 'med-safety';
const OLD = (n: number) => new Date(Date.UTC(2025, 0, 1, 12, 0, n));
const NEW = (n: number) => new Date(Date.UTC(2025, 5, 1, 12, 0, n));
const CUTOFF = '2025-03-01T00:00:00.000Z';

const fb = (card: string): FeedbackInput => ({
  card,
  outcome: 'overridden',
  outcomeTimestamp: '2025-06-02T12:05:00Z',
});

async function count(env: Env, tenant: string, table: string): Promise<number> {
  const raw = await env.raw(tenant);
  const [row] = await raw.query<{ n: number | string }>(
    `SELECT COUNT(*) AS n FROM ${raw.t(table)}`,
  );
  return Number(row?.n ?? 0);
}

/** `old` records before the cutoff (inv-1..), `fresh` after it (inv-101..), feedback on some. */
async function seed(env: Env, tenant: string, old: number, fresh: number): Promise<void> {
  const s = env.stores.store(tenant);
  for (let i = 1; i <= old; i += 1) {
    await s.saveInvocation(invocation(`inv-${String(i)}`, 'PHI', { time: OLD(i) }));
  }
  for (let i = 101; i < 101 + fresh; i += 1) {
    await s.saveInvocation(invocation(`inv-${String(i)}`, 'PHI', { time: NEW(i) }));
  }
  const cards = [...(old > 0 ? ['card-inv-1'] : []), ...(old > 1 ? ['card-inv-2'] : [])];
  if (fresh > 0) {
    cards.push('card-inv-101');
  }
  await s.saveFeedback(cards.map(fb), { service: SERVICE });
}

forEachBackend('tenants/ data plane: retention purge', (backend) => {
  let env: Env;
  beforeEach(async () => {
    env = await makeEnv(backend);
  });
  afterEach(async () => env.close());

  it('deletes exactly the records before the cutoff, with their feedback, card links and heads', async () => {
    const s = env.stores.store('acme');
    await seed(env, 'acme', 5, 3);
    // A scheduled rotation gives every record a head row.
    const job = await s.keys.rotate();
    expect((await env.stores.waitForJob(job.id)).status).to.equal('done');
    expect(await count(env, 'acme', 'invocation_heads')).to.equal(8);
    expect(await count(env, 'acme', 'feedback_heads')).to.equal(3);

    const progress: PurgeProgress[] = [];
    const result = await s.purgeRecords({
      before: CUTOFF,
      batchSize: 2,
      retentionDays: 30,
      onProgress: (p) => progress.push(p),
    });
    expect(result).to.deep.include({
      tenant: 'acme',
      cutoff: CUTOFF,
      dryRun: false,
      invocations: 5,
      feedback: 2,
      batches: 3,
    });
    expect(progress.map((p) => p.invocations)).to.deep.equal([2, 4]);

    expect(await count(env, 'acme', 'invocations')).to.equal(3);
    expect(await count(env, 'acme', 'feedback')).to.equal(1);
    expect(await count(env, 'acme', 'invocation_heads')).to.equal(3);
    expect(await count(env, 'acme', 'feedback_heads')).to.equal(1);
    expect(await count(env, 'acme', 'invocation_cards')).to.equal(3);

    const kept = await s.readInvocation('inv-101');
    expect(kept.feedback).to.have.length(1);
    expect((await s.listInvocations()).map((i) => i.id)).to.deep.equal([
      'inv-101',
      'inv-102',
      'inv-103',
    ]);
    asInstance(await rejection(s.readInvocation('inv-1')), NotFoundError);
    // Feedback on a purged record's card is refused as a card never sent.
    const late = asInstance(
      await rejection(s.saveFeedback([fb('card-inv-3')], { service: SERVICE })),
      NotFoundError,
    );
    expect(late.message).to.match(/card/);

    const events = await s.audit.list({ limit: 10_000 });
    const purged = events.filter((e) => e.type === 'records.purged');
    expect(purged).to.have.length(1);
    expect(purged[0]?.actor).to.equal('system');
    expect(purged[0]?.detail).to.deep.equal({
      cutoff: CUTOFF,
      invocations: 5,
      feedback: 2,
      batches: 3,
      retentionDays: 30,
    });
    expect(JSON.stringify(purged)).to.not.include('PHI');
    expect((await s.audit.verify()).ok).to.equal(true);

    // Nothing left before the cutoff: no event.
    const again = await s.purgeRecords({ before: CUTOFF });
    expect(again).to.deep.include({ invocations: 0, feedback: 0, batches: 0 });
    const after = await s.audit.list({ limit: 10_000 });
    expect(after.filter((e) => e.type === 'records.purged')).to.have.length(1);
  });

  it('counts with dryRun and deletes nothing, audits nothing', async () => {
    const s = env.stores.store('acme');
    await seed(env, 'acme', 4, 2);
    const headBefore = await s.audit.head();
    const dry = await s.purgeRecords({ before: CUTOFF, dryRun: true });
    expect(dry).to.deep.include({ dryRun: true, invocations: 4, feedback: 2, batches: 0 });
    expect(await count(env, 'acme', 'invocations')).to.equal(6);
    expect(await count(env, 'acme', 'feedback')).to.equal(3);
    expect(await s.audit.head()).to.deep.equal(headBefore);
  });

  it('refuses a bad cutoff or batch size naming the option', async () => {
    const s = env.stores.store('acme');
    await seed(env, 'acme', 1, 0);
    for (const [opts, field] of [
      [{ before: 'yesterday' }, 'before'],
      [{ before: CUTOFF, batchSize: 0 }, 'batchSize'],
      [{ before: CUTOFF, batchSize: 1.5 }, 'batchSize'],
      [{ before: CUTOFF, batchSize: 5000 }, 'batchSize'],
    ] as const) {
      const err = asInstance(await rejection(s.purgeRecords(opts)), InvalidInputError);
      expect(err.field).to.equal(field);
    }
    expect(await count(env, 'acme', 'invocations')).to.equal(1);
  });

  it('does not create a store for a tenant that has none', async () => {
    asInstance(
      await rejection(env.stores.store('nobody').purgeRecords({ before: CUTOFF })),
      NotFoundError,
    );
    expect(await env.stores.listTenants()).to.not.include('nobody');
  });

  it('runs beside a rewrap job: the job ends done, the rest reads, a later rotation works', async () => {
    const s = env.stores.store('acme');
    await seed(env, 'acme', 40, 10);
    const job = await s.keys.rotate();
    const [purged, ended] = await Promise.all([
      s.purgeRecords({ before: CUTOFF, batchSize: 7 }),
      env.stores.waitForJob(job.id),
    ]);
    expect(purged.invocations).to.equal(40);
    expect(ended.status).to.equal('done');
    expect(await count(env, 'acme', 'invocations')).to.equal(10);
    // No head row outlives its record.
    const raw = await env.raw('acme');
    const orphans = await raw.query(
      `SELECT k.seq FROM ${raw.t('invocation_heads')} k LEFT JOIN ${raw.t('invocations')} r
       ON r.seq = k.seq WHERE r.seq IS NULL`,
    );
    expect(orphans).to.have.length(0);
    for (let i = 101; i < 111; i += 1) {
      expect((await s.readInvocation(`inv-${String(i)}`)).secret).to.be.an('object');
    }
    // A rotation after the purge moves what is left and destroys the old versions.
    const next = await s.keys.rotate({ emergency: true });
    expect((await env.stores.waitForJob(next.id)).status).to.equal('done');
    const status = await s.keys.status();
    expect(
      status.versions.filter((v) => v.status !== 'destroyed').map((v) => v.version),
    ).to.deep.equal([status.primary]);
    expect((await s.readInvocation('inv-101')).feedback).to.have.length(1);
    expect((await s.audit.verify()).ok).to.equal(true);
  });

  it('skips a tenant another process is purging, and takes over a run whose lease expired', async () => {
    const s = env.stores.store('acme');
    await seed(env, 'acme', 3, 1);
    const raw = await env.raw('acme');
    const meta = (untilMs: number) =>
      JSON.stringify({
        owner: 'other-host:1:abc',
        untilMs,
        cutoff: CUTOFF,
        invocations: 7,
        feedback: 2,
        batches: 2,
      });
    await raw.exec(`INSERT INTO ${raw.t('meta')} ("key", value) VALUES ('purge.run', :v)`, {
      v: meta(Date.now() + 3_600_000),
    });
    const held = await s.purgeRecords({ before: CUTOFF });
    expect(held).to.deep.include({ skipped: 'running_elsewhere', invocations: 0 });
    expect(await count(env, 'acme', 'invocations')).to.equal(4);

    // That run died (lease over): its deletions are counted into the next run's event.
    await raw.exec(`UPDATE ${raw.t('meta')} SET value = :v WHERE "key" = 'purge.run'`, {
      v: meta(Date.now() - 1000),
    });
    const taken = await s.purgeRecords({ before: CUTOFF });
    expect(taken).to.deep.include({ invocations: 3, feedback: 2 });
    expect(taken.resumed).to.deep.equal({ invocations: 7, feedback: 2 });
    const [event] = (await s.audit.list({ limit: 10_000 })).filter(
      (e) => e.type === 'records.purged',
    );
    expect(event?.detail).to.deep.include({
      invocations: 10,
      feedback: 4,
      resumedInvocations: 7,
      resumedFeedback: 2,
    });
    expect(
      await raw.query(`SELECT value FROM ${raw.t('meta')} WHERE "key" = 'purge.run'`),
    ).to.have.length(0);
    expect((await s.audit.verify()).ok).to.equal(true);
  });

  if (backend === 'postgres') {
    // Batches longer than the lease (a slow disk, lock waits; here a trigger sleeping on each
    // deleted record): the lease runs from each batch's commit, for at least twice its length.
    // It used to run from the batch's start, so it was over when the batch committed, and a
    // second replica waiting on the primary row took the live run over and purged beside it.
    it('keeps its lease through batches longer than the lease: a second replica skips it', async () => {
      await seed(env, 'acme', 6, 1);
      const raw = await env.raw('acme');
      const fn = raw.t('invocations').replace('"invocations"', '"slow_purge"');
      await raw.exec(
        `CREATE FUNCTION ${fn}() RETURNS trigger LANGUAGE plpgsql
         AS 'BEGIN PERFORM pg_sleep(0.15); RETURN OLD; END'`,
      );
      await raw.exec(
        `CREATE TRIGGER slow_purge BEFORE DELETE ON ${raw.t('invocations')}
         FOR EACH ROW EXECUTE FUNCTION ${fn}()`,
      );
      // Two replicas with a 100 ms lease; a batch of 2 records takes over 300 ms.
      const a = await env.reopen({ jobLeaseMs: 100 });
      const b = await env.reopen({ jobLeaseMs: 100 });
      await b.store('acme').purgeRecords({ before: CUTOFF, dryRun: true }); // its store open
      let second: Promise<PurgeResult> | undefined;
      const first = await a.store('acme').purgeRecords({
        before: CUTOFF,
        batchSize: 2,
        onProgress: () => {
          second ??= b.store('acme').purgeRecords({ before: CUTOFF, batchSize: 2 });
        },
      });
      expect(second, 'the run had more than one batch').to.not.equal(undefined);
      expect(await second).to.deep.include({ skipped: 'running_elsewhere', invocations: 0 });
      expect(first).to.deep.include({ invocations: 6, feedback: 2, batches: 3 });
      expect(first).to.not.have.property('resumed');
      const events = (await env.stores.store('acme').audit.list({ limit: 10_000 })).filter(
        (e) => e.type === 'records.purged',
      );
      expect(events).to.have.length(1);
      expect(events[0]?.detail).to.deep.include({ invocations: 6, feedback: 2, batches: 3 });
      expect(events[0]?.detail).to.not.have.property('resumedInvocations');
      expect(await count(env, 'acme', 'invocations')).to.equal(1);
    });
  }

  it('takes over a damaged purge state and removes it', async () => {
    const s = env.stores.store('acme');
    await seed(env, 'acme', 2, 1);
    const raw = await env.raw('acme');
    await raw.exec(`INSERT INTO ${raw.t('meta')} ("key", value) VALUES ('purge.run', 'not json')`);
    expect(await s.purgeRecords({ before: CUTOFF })).to.deep.include({ invocations: 2 });
    expect(
      await raw.query(`SELECT value FROM ${raw.t('meta')} WHERE "key" = 'purge.run'`),
    ).to.have.length(0);
  });

  it('keeps backups whole: an older backup restores with its old records, the next purge removes them', async () => {
    const s = env.stores.store('acme');
    await seed(env, 'acme', 5, 2);
    const backup = await env.stores.backupTenant('acme', env.backupDir);
    await s.purgeRecords({ before: CUTOFF, batchSize: 2 });
    // A backup taken after the purge holds only what is left, and verifies.
    const later = await env.stores.backupTenant('acme', env.backupDir);
    expect(later.counts).to.deep.include({ invocations: 2, feedback: 1 });

    const restored = await env.stores.restoreTenant(backup.path);
    expect(restored.counts).to.deep.include({ invocations: 7, feedback: 3 });
    expect((await s.readInvocation('inv-1')).feedback).to.have.length(1);
    expect((await s.audit.verify()).ok).to.equal(true);
    const purged = await s.purgeRecords({ before: CUTOFF });
    expect(purged).to.deep.include({ invocations: 5, feedback: 2 });
    expect(await count(env, 'acme', 'invocations')).to.equal(2);
    expect((await s.audit.verify()).ok).to.equal(true);
    await env.stores.restoreTenant(later.path);
    expect(await count(env, 'acme', 'invocations')).to.equal(2);
  });
});
