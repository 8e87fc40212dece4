import { expect } from 'chai';
import { ConflictError, InvalidInputError, NotFoundError } from '../../../tenants/index.ts';
import { RecordOpenError } from '../../../tenants/data-plane.ts';
import type { JobInfo, RegionStores, TenantStore } from '../../../tenants/data-plane.ts';
import {
  asInstance,
  flipCiphertextByte,
  forEachBackend,
  invocation,
  makeEnv,
  rejection,
  rewriteAsLegacy,
} from './helpers.ts';
import type { Env } from './helpers.ts';

async function seed(s: TenantStore, n: number, prefix = 'inv'): Promise<void> {
  for (let i = 1; i <= n; i += 1) {
    await s.saveInvocation(invocation(`${prefix}-${i}`, `m${i}`));
  }
}

async function until(
  stores: RegionStores,
  id: string,
  pred: (j: JobInfo) => boolean,
): Promise<JobInfo> {
  for (;;) {
    const job = await stores.findJob(id);
    if (job && pred(job)) {
      return job;
    }
    await new Promise((r) => setTimeout(r, 5));
  }
}

async function expectAllOpen(s: TenantStore, ids: string[], version: number): Promise<void> {
  for (const id of ids) {
    const rec = await s.readInvocation(id);
    expect(rec.keyVersion, id).to.equal(version);
    expect(rec.secret.trace).to.be.an('array');
  }
}

forEachBackend('tenants/ data plane: key rotation', (backend) => {
  let env: Env;
  beforeEach(async () => {
    env = await makeEnv(backend);
  });
  afterEach(async () => {
    await env.close();
  });

  it('scheduled: new primary at once, old records readable, old version kept until unused', async () => {
    // Batches of 8 heads (a budget of 2 re-seals), 60 ms apart: the job is seen mid-way.
    const stores = await env.reopen({
      rewrap: { batchSize: 10, scheduledBatchSize: 2, throttleMs: 60 },
    });
    const s = stores.store('acme');
    await seed(s, 40);
    await s.saveFeedback(
      [{ card: 'card-inv-1', outcome: 'accepted', outcomeTimestamp: '2025-01-01T13:00:00Z' }],
      {
        service: 'med-safety',
      },
    );
    const job = await s.keys.rotate({ actor: 'op-1' });
    expect(job).to.include({
      id: 'rewrap.acme.1',
      tenant: 'acme',
      kind: 'dek-rewrap',
      status: 'running',
      total: 41,
    });
    expect(await rejection(s.keys.rotate())).to.be.instanceOf(ConflictError);
    const mid = await until(stores, job.id, (j) => j.done >= 10 && j.done < j.total);
    expect(mid.status).to.equal('running');
    const status = await s.keys.status();
    expect(status.primary).to.equal(2);
    expect(status.runningJob).to.equal(job.id);
    const v1 = status.versions.find((v) => v.version === 1)!;
    expect(v1.status).to.equal('active');
    expect(v1.records).to.be.greaterThan(0);
    expect((await s.saveInvocation(invocation('inv-new'))).keyVersion).to.equal(2);
    // Mid-job, records under both versions open.
    const versionsSeen = new Set<number>();
    for (const id of ['inv-1', 'inv-40']) {
      versionsSeen.add((await s.readInvocation(id)).keyVersion);
    }
    expect([...versionsSeen].sort()).to.deep.equal([1, 2]);
    const done = await stores.waitForJob(job.id);
    expect(done).to.include({ status: 'done', done: 41, total: 41, etaSeconds: 0 });
    const after = await s.keys.status();
    expect(after.versions.map((v) => [v.version, v.status, v.records])).to.deep.equal([
      [1, 'destroyed', 0],
      [2, 'primary', 42],
    ]);
    await expectAllOpen(s, ['inv-1', 'inv-20', 'inv-40', 'inv-new'], 2);
    const types = (await s.audit.list()).map((e) => `${e.type}:${JSON.stringify(e.detail ?? {})}`);
    expect(
      types.some((t) => t.startsWith('key.rotate:') && t.includes('"emergency":false')),
    ).to.equal(true);
    expect(
      (await s.audit.list()).filter((e) => e.type === 'key.destroy').map((e) => e.detail),
    ).to.deep.equal([{ version: 1, reason: 'rewrapped' }]);
    expect(types.some((t) => t.startsWith('key.rewrap:') && t.includes('"done":41'))).to.equal(
      true,
    );
    expect((await s.audit.list()).find((e) => e.type === 'key.rotate')?.actor).to.equal('op-1');
    expect(await s.audit.verify()).to.include({ ok: true });
  });

  it('emergency: the compromised version is retired at once and destroyed once rewrapped', async () => {
    const stores = await env.reopen({
      rewrap: { batchSize: 10, throttleMs: 1000, emergencyThrottleMs: 0 },
    });
    const s = stores.store('acme');
    await seed(s, 30);
    const scheduled = await s.keys.rotate();
    const emergency = await s.keys.rotate({ emergency: true });
    const status = await s.keys.status();
    expect(
      status.versions.map((v) => [v.version, v.status, v.compromised]),
    ).to.deep.include.members([
      [2, 'retired', true],
      [3, 'primary', false],
    ]);
    // Calls keep working: old records open, new ones use the new primary.
    expect((await s.readInvocation('inv-1')).secret.context).to.deep.equal({
      patientId: 'm1-patient',
      userId: 'Practitioner/1',
    });
    expect((await s.saveInvocation(invocation('inv-31'))).keyVersion).to.equal(3);
    const done = await stores.waitForJob(emergency.id);
    expect(done).to.include({ status: 'done', emergency: true, total: 30, done: 30 });
    expect((await stores.findJob(scheduled.id))?.status).to.equal('superseded');
    const after = await s.keys.status();
    expect(after.versions.map((v) => [v.version, v.status])).to.deep.equal([
      [1, 'destroyed'],
      [2, 'destroyed'],
      [3, 'primary'],
    ]);
    const destroyed = (await s.audit.list())
      .filter((e) => e.type === 'key.destroy')
      .map((e) => e.detail);
    expect(destroyed).to.deep.include({ version: 2, reason: 'compromised' });
    await expectAllOpen(s, ['inv-1', 'inv-15', 'inv-30', 'inv-31'], 3);
  });

  it('under load: saves and reads during a rewrap all succeed and open', async () => {
    const stores = await env.reopen({ rewrap: { batchSize: 10, throttleMs: 5 } });
    const s = stores.store('acme');
    await seed(s, 120);
    const job = await s.keys.rotate();
    let n = 0;
    let reads = 0;
    for (;;) {
      const current = await stores.findJob(job.id);
      if (current?.status !== 'running') {
        break;
      }
      n += 1;
      const results = await Promise.all([
        s.saveInvocation(invocation(`load-${n}`, `load${n}`)),
        s.readInvocation(`inv-${(n % 120) + 1}`),
        s.readInvocation(`inv-${((n * 7) % 120) + 1}`),
        s.saveFeedback(
          [
            {
              card: `card-inv-${(n % 120) + 1}`,
              outcome: 'accepted',
              outcomeTimestamp: new Date(Date.UTC(2025, 1, 1, 0, 0, n)).toISOString(),
            },
          ],
          { service: 'med-safety' },
        ),
        s.listInvocations({ limit: 5 }),
      ]);
      reads += 2;
      expect(results[0].keyVersion).to.equal(2);
    }
    expect(n).to.be.greaterThan(2);
    const done = await stores.waitForJob(job.id);
    expect(done).to.include({ status: 'done', total: 120, done: 120 });
    const ids = [
      ...Array.from({ length: 120 }, (_, i) => `inv-${i + 1}`),
      ...Array.from({ length: n }, (_, i) => `load-${i + 1}`),
    ];
    await expectAllOpen(s, ids, 2);
    expect(reads).to.be.greaterThan(4);
  });

  /** The stored envelopes (invocations by id, then feedback) and the head rows, raw. */
  async function storedState(tenant: string) {
    const raw = await env.raw(tenant);
    const sealed = [
      ...(await raw.query<{ id: string; sealed: string | Buffer; key_version: number }>(
        `SELECT id, sealed, key_version FROM ${raw.t('invocations')} ORDER BY id`,
      )),
      ...(await raw.query<{ id: string; sealed: string | Buffer; key_version: number }>(
        `SELECT id, sealed, key_version FROM ${raw.t('feedback')}`,
      )),
    ];
    const heads = [
      ...(await raw.query<{ seq: number; key_version: number; head: string | Buffer }>(
        `SELECT seq, key_version, head FROM ${raw.t('invocation_heads')} ORDER BY seq`,
      )),
      ...(await raw.query<{ seq: number; key_version: number; head: string | Buffer }>(
        `SELECT seq, key_version, head FROM ${raw.t('feedback_heads')}`,
      )),
    ];
    return { raw, sealed, heads };
  }

  /** A record-key envelope (or head) in the store's form, naming `version`. */
  function expectRecordKeyForm(v: string | Buffer, version: number, head = false): void {
    if (backend === 'sqlite') {
      // A BLOB: "ccds" 0x03, then the version; a head is exactly 69 bytes.
      expect(Buffer.isBuffer(v)).to.equal(true);
      const b = v as Buffer;
      expect(b.subarray(0, 5).toString('latin1')).to.equal('ccds\x03');
      expect(b.readUInt32BE(5)).to.equal(version);
      if (head) {
        expect(b.length).to.equal(69);
      }
    } else {
      expect(v)
        .to.be.a('string')
        .and.match(new RegExp(`^ccds3\\.${version}\\.[A-Za-z0-9_-]{80}${head ? '$' : '\\.'}`));
    }
  }

  it('scheduled: re-wraps record keys only (rows and ciphertexts untouched); emergency re-seals', async () => {
    const s = env.stores.store('acme');
    await seed(s, 3);
    await s.saveFeedback(
      [{ card: 'card-inv-1', outcome: 'accepted', outcomeTimestamp: '2025-01-01T13:00:00Z' }],
      { service: 'med-safety' },
    );
    const before = await storedState('acme');
    expect(before.sealed).to.have.length(4);
    for (const r of before.sealed) {
      expectRecordKeyForm(r.sealed, 1);
    }
    expect(before.heads).to.deep.equal([]);

    for (const version of [2, 3]) {
      const job = await s.keys.rotate();
      expect(await env.stores.waitForJob(job.id)).to.include({ status: 'done', done: 4 });
      const after = await storedState('acme');
      // The records' rows are byte for byte what they were: only the heads moved.
      expect(after.sealed).to.deep.equal(before.sealed);
      expect(after.heads).to.have.length(4);
      for (const k of after.heads) {
        expect(k.key_version).to.equal(version);
        expectRecordKeyForm(k.head, version, true);
      }
      await expectAllOpen(s, ['inv-1', 'inv-2', 'inv-3'], version);
      const rec = await s.readInvocation('inv-1');
      expect(rec.secret).to.deep.equal(invocation('inv-1', 'm1').secret);
      expect(rec.feedback.map((f) => f.keyVersion)).to.deep.equal([version]);
      expect((await s.listInvocations()).map((r) => r.keyVersion)).to.deep.equal([
        version,
        version,
        version,
      ]);
      const status = await s.keys.status();
      expect(status.versions.map((v) => [v.version, v.status, v.records])).to.deep.equal([
        ...Array.from({ length: version - 1 }, (_, i) => [i + 1, 'destroyed', 0]),
        [version, 'primary', 4],
      ]);
    }

    // Emergency: every record opened and sealed again under a fresh record key; the rewritten
    // rows' head rows are gone (the store's trigger).
    const job = await s.keys.rotate({ emergency: true });
    expect(await env.stores.waitForJob(job.id)).to.include({ status: 'done', done: 4 });
    const resealed = await storedState('acme');
    expect(resealed.heads).to.deep.equal([]);
    for (const [i, r] of resealed.sealed.entries()) {
      expect(r.key_version).to.equal(4);
      expectRecordKeyForm(r.sealed, 4);
      expect(r.sealed).to.not.deep.equal(before.sealed[i]!.sealed);
    }
    await expectAllOpen(s, ['inv-1', 'inv-2', 'inv-3'], 4);
    expect((await s.readInvocation('inv-2')).secret).to.deep.equal(
      invocation('inv-2', 'm2').secret,
    );
  });

  it('records sealed before record keys (both older forms) open, and a rotation re-seals them in the store form', async () => {
    const s = env.stores.store('acme');
    await seed(s, 3);
    await rewriteAsLegacy(env, 'acme', 'invocations', 'inv-1', 'text');
    if (backend === 'sqlite') {
      await rewriteAsLegacy(env, 'acme', 'invocations', 'inv-2', 'binary');
    }
    const raw = await env.raw('acme');
    const sealedOf = async (id: string) =>
      (
        await raw.query<{ sealed: string | Buffer }>(
          `SELECT sealed FROM ${raw.t('invocations')} WHERE id = :id`,
          { id },
        )
      )[0]!.sealed;
    expect(await sealedOf('inv-1'))
      .to.be.a('string')
      .and.match(/^ccds1\.1\./);
    if (backend === 'sqlite') {
      expect(((await sealedOf('inv-2')) as Buffer).subarray(0, 5).toString('latin1')).to.equal(
        'ccds\x02',
      );
    }
    for (const id of ['inv-1', 'inv-2', 'inv-3']) {
      expect((await s.readInvocation(id)).secret).to.deep.equal(
        invocation(id, `m${id.slice(4)}`).secret,
      );
    }
    const job = await s.keys.rotate();
    expect(await env.stores.waitForJob(job.id)).to.include({ status: 'done', done: 3 });
    const after = await storedState('acme');
    const legacy = backend === 'sqlite' ? ['inv-1', 'inv-2'] : ['inv-1'];
    for (const r of after.sealed) {
      // Older forms were re-sealed (row rewritten, under version 2); the other only re-wrapped.
      expectRecordKeyForm(r.sealed, legacy.includes(r.id) ? 2 : 1);
      expect(r.key_version).to.equal(legacy.includes(r.id) ? 2 : 1);
    }
    expect(after.heads).to.have.length(3 - legacy.length);
    await expectAllOpen(s, ['inv-1', 'inv-2', 'inv-3'], 2);
    expect((await s.readInvocation('inv-1')).secret).to.deep.equal(
      invocation('inv-1', 'm1').secret,
    );
  });

  it('a store from before head tables gets them when opened, and rotates like a new one', async () => {
    const s = env.stores.store('acme');
    await seed(s, 2);
    const raw = await env.raw('acme');
    for (const table of ['invocations', 'feedback']) {
      await raw.exec(
        backend === 'sqlite'
          ? `DROP TRIGGER ${table}_sealed_drops_head`
          : `DROP TRIGGER ${table}_sealed_drops_head ON ${raw.t(table)}`,
      );
    }
    await raw.exec(`DROP TABLE ${raw.t('invocation_heads')}`);
    await raw.exec(`DROP TABLE ${raw.t('feedback_heads')}`);
    await raw.exec(`UPDATE ${raw.t('meta')} SET value = '1' WHERE key = 'schema'`);
    const stores = await env.reopen();
    const again = stores.store('acme');
    expect((await again.readInvocation('inv-1')).keyVersion).to.equal(1);
    const job = await again.keys.rotate();
    expect(await stores.waitForJob(job.id)).to.include({ status: 'done', done: 2 });
    await expectAllOpen(again, ['inv-1', 'inv-2'], 2);
    expect((await storedState('acme')).heads).to.have.length(2);
    const [schema] = await raw.query<{ value: string }>(
      `SELECT value FROM ${raw.t('meta')} WHERE key = 'schema'`,
    );
    expect(schema?.value).to.equal('6'); // upgraded to the current version (4: wrap counts, 5: card suggestions, 6: card rules)
  });

  it("a head row copied from another table or another tenant's store fails closed", async () => {
    const s = env.stores.store('acme');
    await seed(s, 1);
    await s.saveFeedback(
      [{ card: 'card-inv-1', outcome: 'accepted', outcomeTimestamp: '2025-01-01T13:00:00Z' }],
      { service: 'med-safety' },
    );
    const beta = env.stores.store('beta');
    await seed(beta, 1);
    for (const store of [s, beta]) {
      const job = await store.keys.rotate();
      expect(await env.stores.waitForJob(job.id)).to.include({ status: 'done' });
    }
    const acme = await env.raw('acme');
    const headOf = async (raw: typeof acme, table: string) =>
      (
        await raw.query<{ seq: number; head: string | Buffer }>(
          `SELECT seq, head FROM ${raw.t(table)} ORDER BY seq`,
        )
      )[0]!;
    const own = await headOf(acme, 'invocation_heads');
    const ownFeedback = await headOf(acme, 'feedback_heads');
    const betaHead = await headOf(await env.raw('beta'), 'invocation_heads');
    // Same seq, same DEK version number, another tenant's wrap: refused.
    expect(betaHead.seq).to.equal(own.seq);
    const put = (table: string, seq: number, head: string | Buffer) =>
      acme.exec(`UPDATE ${acme.t(table)} SET head = :head WHERE seq = :seq`, { head, seq });
    await put('invocation_heads', own.seq, betaHead.head);
    const crossTenant = await rejection(s.readInvocation('inv-1'));
    expect(asInstance(crossTenant, RecordOpenError).reason).to.equal('authentication_failed');
    await put('invocation_heads', own.seq, own.head);
    expect((await s.readInvocation('inv-1')).feedback).to.have.length(1);
    // The invocation's head given to the feedback row of the same seq: the wrap names its table.
    expect(ownFeedback.seq).to.equal(own.seq);
    await put('feedback_heads', ownFeedback.seq, own.head);
    const crossTable = await rejection(s.readInvocation('inv-1'));
    expect(asInstance(crossTable, RecordOpenError).reason).to.equal('authentication_failed');
  });

  it('a head row is bound to its record: tampered or moved to another record, it fails closed', async () => {
    const stores = await env.reopen({ rewrap: { batchSize: 10, emergencyThrottleMs: 0 } });
    const s = stores.store('acme');
    await seed(s, 3);
    const first = await s.keys.rotate();
    expect(await stores.waitForJob(first.id)).to.include({ status: 'done', done: 3 });
    const { raw, heads } = await storedState('acme');
    const [h1, h2] = heads;
    // inv-2 given inv-1's head: the wrap's AAD names inv-1.
    await raw.exec(`UPDATE ${raw.t('invocation_heads')} SET head = :head WHERE seq = :seq`, {
      head: h1!.head,
      seq: h2!.seq,
    });
    const moved = await rejection(s.readInvocation('inv-2'));
    expect(asInstance(moved, RecordOpenError).reason).to.equal('authentication_failed');
    // inv-3's wrapped record key with one bit flipped.
    const [h3] = await raw.query<{ head: string | Buffer }>(
      `SELECT head FROM ${raw.t('invocation_heads')} WHERE seq = :seq`,
      { seq: heads[2]!.seq },
    );
    const flipped =
      typeof h3!.head === 'string'
        ? flipCiphertextByte(`${h3!.head}.AA.AA.AA`, 1, 3).split('.').slice(0, 3).join('.')
        : (() => {
            const b = Buffer.from(h3!.head);
            b[30] = (b[30] ?? 0) ^ 0x01;
            return b;
          })();
    await raw.exec(`UPDATE ${raw.t('invocation_heads')} SET head = :head WHERE seq = :seq`, {
      head: flipped,
      seq: heads[2]!.seq,
    });
    const tampered = await rejection(s.readInvocation('inv-3'));
    expect(asInstance(tampered, RecordOpenError).reason).to.equal('authentication_failed');
    expect((await s.readInvocation('inv-1')).keyVersion).to.equal(2);
    // A scheduled rotation unwraps every head: the tampered ones fail the job, nothing is lost.
    const second = await s.keys.rotate();
    const failed = await stores.waitForJob(second.id);
    expect(failed).to.include({ status: 'failed', done: 0 });
    expect((await s.keys.status()).versions.map((v) => v.status)).to.deep.equal([
      'destroyed',
      'active',
      'primary',
    ]);
    expect((await s.readInvocation('inv-1')).keyVersion).to.equal(2);
  });

  it('KEK rotation rewraps DEKs only: records untouched and still readable', async () => {
    const s = env.stores.store('acme');
    await seed(s, 5);
    await env.stores.store('beta').saveInvocation(invocation('b-1'));
    const raw = await env.raw('acme');
    const sealedBefore = await raw.query<{ id: string; sealed: string }>(
      `SELECT id, sealed FROM ${raw.t('invocations')} ORDER BY id`,
    );
    const [dekBefore] = await raw.query<{ wrapped: string; kek_version: number }>(
      `SELECT wrapped, kek_version FROM ${raw.t('dek_versions')}`,
    );
    const job = await env.stores.rotateKek({ actor: 'op-2' });
    expect(job).to.include({ id: `kek.${env.region}.2`, kind: 'kek-rewrap' });
    const done = await env.stores.waitForJob(job.id);
    expect(done).to.include({ status: 'done', done: 2, total: 2 });
    const sealedAfter = await raw.query<{ id: string; sealed: string }>(
      `SELECT id, sealed FROM ${raw.t('invocations')} ORDER BY id`,
    );
    expect(sealedAfter).to.deep.equal(sealedBefore);
    const [dekAfter] = await raw.query<{ wrapped: string; kek_version: number }>(
      `SELECT wrapped, kek_version FROM ${raw.t('dek_versions')}`,
    );
    expect(dekBefore!.kek_version).to.equal(1);
    expect(dekAfter!.kek_version).to.equal(2);
    expect(dekAfter!.wrapped).to.not.equal(dekBefore!.wrapped);
    expect((await env.provider.describe()).keks.map((k) => [k.version, k.status])).to.deep.equal([
      [1, 'retired'],
      [2, 'primary'],
    ]);
    const fresh = await env.reopen(); // no cached DEKs: unwraps under KEK 2
    await expectAllOpen(fresh.store('acme'), ['inv-1', 'inv-5'], 1);
    expect((await fresh.store('beta').readInvocation('b-1')).id).to.equal('b-1');
    const kekEvent = (await fresh.store('acme').audit.list()).find(
      (e) => e.type === 'key.kek.rewrap',
    );
    expect(kekEvent).to.deep.include({ actor: 'op-2', detail: { deks: 1, kekVersion: 2 } });
  });

  // Hook-path writes wait while a batch is written: a scheduled rotation keeps its batches
  // short (scheduledBatchSize), an emergency one uses batchSize.
  it('a tampered record fails the rewrap job at its batch (also when read ahead); nothing else is lost', async () => {
    const stores = await env.reopen({ rewrap: { batchSize: 10, emergencyThrottleMs: 0 } });
    const s = stores.store('acme');
    await seed(s, 30);
    const raw = await env.raw('acme');
    const [row] = await raw.query<{ sealed: string | Buffer }>(
      `SELECT sealed FROM ${raw.t('invocations')} WHERE id = 'inv-15'`,
    );
    await raw.exec(`UPDATE ${raw.t('invocations')} SET sealed = :sealed WHERE id = 'inv-15'`, {
      sealed: flipCiphertextByte(row!.sealed, 3, 4),
    });
    const job = await s.keys.rotate({ emergency: true });
    const failed = await stores.waitForJob(job.id);
    // The first batch (inv-1..10) was written; the second, holding inv-15, failed the job
    // whether it was first read ahead during the first batch's write or not.
    expect(failed).to.include({ status: 'failed', done: 10, total: 30 });
    expect(failed.error).to.be.a('string').and.not.include('m15');
    await expectAllOpen(s, ['inv-1', 'inv-10'], 2);
    await expectAllOpen(s, ['inv-11', 'inv-16', 'inv-30'], 1);
    const err = await rejection(s.readInvocation('inv-15'));
    expect(asInstance(err, RecordOpenError).reason).to.equal('authentication_failed');
    // Version 1 still holds records: it is not destroyed.
    const status = await s.keys.status();
    expect(status.versions.find((v) => v.version === 1)).to.deep.include({ records: 20 });
    expect(status.versions.find((v) => v.version === 1)?.status).to.not.equal('destroyed');
  });

  it('moves scheduled rotations in scheduledBatchSize budgets (a head a quarter) and emergencies in batchSize', async () => {
    const stores = await env.reopen({
      rewrap: {
        batchSize: 20,
        scheduledBatchSize: 7,
        throttleMs: 60_000,
        emergencyThrottleMs: 60_000,
      },
    });
    const s = stores.store('acme');
    await seed(s, 30);
    for (const id of ['inv-1', 'inv-2', 'inv-3']) {
      await rewriteAsLegacy(env, 'acme', 'invocations', id, 'text');
    }
    // A budget of 7 re-seals = 28 heads: 3 records re-sealed (12), then 16 heads.
    const scheduled = await s.keys.rotate();
    expect((await until(stores, scheduled.id, (j) => j.done > 0)).done).to.equal(19);
    const emergency = await s.keys.rotate({ emergency: true });
    const first = await until(stores, emergency.id, (j) => j.done > 0);
    expect(first.done).to.equal(20);
    for (const [rewrap, field] of [
      [{ scheduledBatchSize: 0 }, 'rewrap.scheduledBatchSize'],
      [{ scheduledBatchSize: 1.5 }, 'rewrap.scheduledBatchSize'],
      [{ batchSize: 10_001 }, 'rewrap.batchSize'],
    ] as const) {
      const err = await rejection(env.reopen({ rewrap }));
      expect(asInstance(err, InvalidInputError).field).to.equal(field);
    }
  });

  it('a scheduled rotation over mixed records, its batches cut short by the budget, moves each exactly once', async () => {
    const stores = await env.reopen({ rewrap: { scheduledBatchSize: 3, throttleMs: 0 } });
    const s = stores.store('acme');
    await seed(s, 30);
    for (let i = 1; i <= 30; i += 3) {
      await rewriteAsLegacy(env, 'acme', 'invocations', `inv-${i}`, 'text');
    }
    const job = await s.keys.rotate();
    const done = await stores.waitForJob(job.id);
    expect(done).to.include({ status: 'done', done: 30, total: 30 });
    const { sealed, heads } = await storedState('acme');
    const legacy = new Set(Array.from({ length: 10 }, (_, k) => `inv-${3 * k + 1}`));
    for (const r of sealed) {
      expect(r.key_version, r.id).to.equal(legacy.has(r.id) ? 2 : 1);
    }
    expect(heads).to.have.length(20);
    expect(heads.every((k) => k.key_version === 2)).to.equal(true);
    await expectAllOpen(
      s,
      Array.from({ length: 30 }, (_, i) => `inv-${i + 1}`),
      2,
    );
    const rewrap = (await s.audit.list()).filter((e) => e.type === 'key.rewrap');
    expect(rewrap.map((e) => e.detail)).to.deep.include({
      job: job.id,
      done: 30,
      total: 30,
      destroyed: '1',
    });
  });

  it('resumes an interrupted DEK rewrap and an unfinished KEK rotation after a restart', async () => {
    const slow = await env.reopen({ rewrap: { batchSize: 5, throttleMs: 10_000 } });
    const s = slow.store('acme');
    await seed(s, 25);
    const job = await s.keys.rotate();
    await until(slow, job.id, (j) => j.done >= 5);
    await slow.close(); // a restart: the job row stays `running`
    await env.provider.rotateKek(); // the provider rotated, but no KEK job ran
    const restarted = await env.reopen({ rewrap: { batchSize: 5, throttleMs: 0 } });
    const resumed = await restarted.resumePendingJobs();
    expect(resumed.map((j) => j.kind).sort()).to.deep.equal(['dek-rewrap', 'kek-rewrap']);
    const dekDone = await restarted.waitForJob(job.id);
    expect(dekDone).to.include({ status: 'done', done: 25, total: 25 });
    const kekJob = resumed.find((j) => j.kind === 'kek-rewrap')!;
    expect((await restarted.waitForJob(kekJob.id)).status).to.equal('done');
    const status = await restarted.store('acme').keys.status();
    expect(status.versions.map((v) => [v.version, v.status, v.kekVersion])).to.deep.equal([
      [1, 'destroyed', null],
      [2, 'primary', 2],
    ]);
    await expectAllOpen(restarted.store('acme'), ['inv-1', 'inv-25'], 2);
  });

  it('reports unknown jobs as not found', async () => {
    expect(await env.stores.findJob('rewrap.acme.9')).to.equal(undefined);
    expect(await env.stores.findJob('nonsense')).to.equal(undefined);
    expect(await rejection(env.stores.waitForJob('rewrap.nobody.1'))).to.be.instanceOf(
      NotFoundError,
    );
    expect(await env.stores.listJobs('nobody')).to.deep.equal([]);
  });
});
