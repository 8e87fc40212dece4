/**
 * The AES-GCM invocation limit of a DEK version, enforced (wrap-limit.ts): every encryption
 * under a version is counted in its row (record sealed, head re-wrapped, record re-sealed), an
 * upgraded store starts from a lower bound, the soft limit rotates the tenant's keys once
 * (audited, actor `system`, reason `wrap_limit`), and the hard limit refuses writes and stops a
 * rewrap job that would pass it. Real stores, both backends, tiny limits.
 */
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { expect } from 'chai';
import { ConflictError, InvalidInputError } from '../../../tenants/index.ts';
import {
  BackupError,
  KeyUnavailableError,
  WrapLimitError,
  tenantSchemaName,
} from '../../../tenants/data-plane.ts';
import type {
  FeedbackInput,
  KeyProvider,
  RegionStores,
  TenantStore,
  WrapLimitEvent,
} from '../../../tenants/data-plane.ts';
import { createWrapLimitWatch } from '../../../tenants/data-plane/wrap-limit.ts';
import { asInstance, forEachBackend, invocation, makeEnv, rejection } from './helpers.ts';
import type { Env } from './helpers.ts';

const fb = (card: string, minute: number): FeedbackInput => ({
  card,
  outcome: 'overridden',
  outcomeTimestamp: `2025-01-01T12:${String(minute).padStart(2, '0')}:00Z`,
});

/**
 * Counts AES-GCM encryptions under a DEK (a KeyObject; a record's own key is a Buffer) until
 * `stop()`.
 */
function watchDekEncryptions(): { count: number; stop: () => void } {
  const original = crypto.createCipheriv;
  const watch = {
    count: 0,
    stop: () => {
      (crypto as { createCipheriv: unknown }).createCipheriv = original;
    },
  };
  (crypto as { createCipheriv: unknown }).createCipheriv = (
    ...args: Parameters<typeof crypto.createCipheriv>
  ) => {
    if (!Buffer.isBuffer(args[1])) {
      watch.count += 1;
    }
    return original(...args);
  };
  return watch;
}

async function wraps(s: TenantStore): Promise<Record<number, number>> {
  const status = await s.keys.status();
  return Object.fromEntries(status.versions.map((v) => [v.version, v.wraps]));
}

async function save(s: TenantStore, from: number, n: number): Promise<void> {
  for (let i = from; i < from + n; i += 1) {
    await s.saveInvocation(invocation(`inv-${String(i)}`));
  }
}

/** Waits until `s`'s primary version is `version` (an automatic rotation runs after a write). */
async function primaryBecomes(s: TenantStore, version: number): Promise<void> {
  for (let i = 0; i < 200; i += 1) {
    if ((await s.keys.status()).primary === version) {
      return;
    }
    await new Promise((r) => setTimeout(r, 25));
  }
  throw new Error(`primary never became ${String(version)}`);
}

/** The provider, refusing to wrap new DEKs (an HSM/KMS that is down for writes). */
function refusingWraps(provider: KeyProvider): KeyProvider {
  return {
    ...provider,
    wrapDek: () => Promise.reject(new KeyUnavailableError('provider', 'the provider is down')),
  };
}

forEachBackend('data plane: DEK wrap counts and limits', (backend) => {
  let env: Env;
  afterEach(async () => {
    await env.close();
  });

  it('counts every wrap per version: single and batched writes, feedback, a scheduled rewrap; kept across a reopen', async function () {
    this.timeout(30_000);
    env = await makeEnv(backend);
    const s = env.stores.store('acme');
    await save(s, 1, 1);
    expect(await wraps(s)).to.deep.equal({ 1: 1 });
    // Written together: group-committed in batches.
    await Promise.all(
      Array.from({ length: 12 }, (_, i) => s.saveInvocation(invocation(`inv-${String(i + 2)}`))),
    );
    expect(await wraps(s)).to.deep.equal({ 1: 13 });
    await s.saveFeedback([fb('card-inv-1', 1), fb('card-inv-2', 2), fb('card-inv-2', 2)], {
      service: 'med-safety',
    });
    expect(await wraps(s)).to.deep.equal({ 1: 15 }); // the repeat is stored once
    const job = await s.keys.rotate({ actor: 'op-1' });
    expect(await env.stores.waitForJob(job.id)).to.include({ status: 'done', done: 15 });
    // Every record key re-wrapped once under v2; v1's count stays (destroyed, not reset).
    expect(await wraps(s)).to.deep.equal({ 1: 15, 2: 15 });
    await save(s, 20, 2);
    expect(await wraps(s)).to.deep.equal({ 1: 15, 2: 17 });
    const again = await env.reopen();
    expect(await wraps(again.store('acme'))).to.deep.equal({ 1: 15, 2: 17 });
    const status = await again.store('acme').keys.status();
    expect(status.wrapLimits).to.deep.equal({ soft: 2 ** 31, hard: 2 ** 32 - 2 ** 20 });
  });

  it('an emergency rotation counts each re-sealed record under the new version', async function () {
    this.timeout(30_000);
    env = await makeEnv(backend);
    const s = env.stores.store('acme');
    await save(s, 1, 4);
    const job = await s.keys.rotate({ emergency: true });
    expect(await env.stores.waitForJob(job.id)).to.include({ status: 'done', done: 4 });
    expect(await wraps(s)).to.deep.equal({ 1: 4, 2: 4 });
  });

  it('a backup restores with its wrap counts, not counted again by the restore, and never below the live count of the same key', async function () {
    this.timeout(30_000);
    env = await makeEnv(backend);
    const s = env.stores.store('acme');
    await save(s, 1, 3);
    const job = await s.keys.rotate();
    await env.stores.waitForJob(job.id);
    await save(s, 4, 1);
    expect(await wraps(s)).to.deep.equal({ 1: 3, 2: 4 });
    const backup = await env.stores.backupTenant('acme', env.backupDir);
    await save(s, 5, 2);
    expect(await wraps(s)).to.deep.equal({ 1: 3, 2: 6 });
    await env.stores.restoreTenant(backup.path, { tenant: 'acme' });
    // v2 made 6 encryptions, whatever the snapshot says: the restore keeps the live count.
    expect(await wraps(s)).to.deep.equal({ 1: 3, 2: 6 });
    await save(s, 5, 1);
    expect(await wraps(s)).to.deep.equal({ 1: 3, 2: 7 });
  });

  it('restoring one backup again and again never gives a key more encryptions than its limit', async function () {
    this.timeout(30_000);
    env = await makeEnv(backend);
    await save(env.stores.store('acme'), 1, 2);
    const backup = await env.stores.backupTenant('acme', env.backupDir);
    await env.stores.close();
    // No rotation can start: only the count stands between the key and the hard limit.
    const stores = await env.reopen({
      keyProvider: refusingWraps(env.provider),
      wrapLimits: { soft: 5, hard: 8 },
    });
    const s = stores.store('acme');
    let written = 2;
    for (let round = 0; round < 3; round += 1) {
      for (let i = 0; i < 4; i += 1) {
        try {
          await s.saveInvocation(invocation(`inv-${String(round)}-${String(i)}`));
          written += 1;
        } catch (err) {
          expect(asInstance(err as Error, WrapLimitError).reason).to.equal('wrap_limit');
        }
      }
      await stores.restoreTenant(backup.path, { tenant: 'acme' });
    }
    // Every encryption under v1 counted across the restores: no more than the hard limit.
    expect(written).to.equal(8);
    expect(await wraps(s)).to.deep.equal({ 1: 8 });
  });

  it('a restore that would bring back a DEK version an emergency rotation marked compromised is refused, the live store unchanged', async function () {
    this.timeout(30_000);
    env = await makeEnv(backend);
    const s = env.stores.store('acme');
    await save(s, 1, 2);
    const backup = await env.stores.backupTenant('acme', env.backupDir);
    const job = await s.keys.rotate({ emergency: true });
    expect(await env.stores.waitForJob(job.id)).to.include({ status: 'done' });
    await save(s, 3, 1);
    const before = await s.keys.status();
    expect(before.versions.find((v) => v.version === 1)?.status).to.equal('destroyed');
    const err = await rejection(env.stores.restoreTenant(backup.path, { tenant: 'acme' }));
    const refused = asInstance(err, BackupError);
    expect(refused.reason).to.equal('dek_compromised');
    expect(refused.message).to.match(/DEK version 1 .*compromised/);
    // Nothing restored: the live store still serves, under v2, with its records and counts.
    const after = await s.keys.status();
    expect(after.primary).to.equal(2);
    expect(after.versions).to.deep.equal(before.versions);
    expect((await s.readInvocation('inv-3')).keyVersion).to.equal(2);
    expect((await s.readInvocation('inv-1')).id).to.equal('inv-1');
    await save(s, 4, 1);
    expect((await wraps(s))[2]).to.equal(4);
  });

  it('a restore from before a scheduled rotation brings its DEK version back with the live final count (point in time)', async function () {
    this.timeout(30_000);
    env = await makeEnv(backend);
    const s = env.stores.store('acme');
    await save(s, 1, 2);
    const backup = await env.stores.backupTenant('acme', env.backupDir);
    await save(s, 3, 2); // v1: 4 wraps, the backup says 2
    const job = await s.keys.rotate();
    expect(await env.stores.waitForJob(job.id)).to.include({ status: 'done' });
    expect((await s.keys.status()).versions.find((v) => v.version === 1)?.status).to.equal(
      'destroyed',
    );
    await env.stores.restoreTenant(backup.path, { tenant: 'acme' });
    const restored = await s.keys.status();
    expect(restored.primary).to.equal(1);
    expect(await wraps(s)).to.deep.equal({ 1: 4 });
    expect((await s.readInvocation('inv-1')).keyVersion).to.equal(1);
    await save(s, 5, 1);
    expect(await wraps(s)).to.deep.equal({ 1: 5 });
  });

  it('feedback writes committed together in one group count each other against the hard limit', async function () {
    this.timeout(30_000);
    env = await makeEnv(backend);
    await env.stores.provisionTenant('acme');
    await env.stores.close();
    const stores = await env.reopen({
      keyProvider: refusingWraps(env.provider),
      wrapLimits: { soft: 5, hard: 10 },
    });
    const s = stores.store('acme');
    await save(s, 1, 8);
    // Issued together: all but the first wait for its commit and share the next one.
    const results = await Promise.allSettled(
      Array.from({ length: 8 }, (_, i) =>
        s.saveFeedback([fb(`card-inv-${String(i + 1)}`, i)], { service: 'med-safety' }),
      ),
    );
    for (const r of results) {
      if (r.status === 'rejected') {
        expect(asInstance(r.reason as Error, WrapLimitError).reason).to.equal('wrap_limit');
      }
    }
    expect(results.filter((r) => r.status === 'fulfilled')).to.have.length(2);
    expect(await wraps(s)).to.deep.equal({ 1: 10 });
  });

  it('a re-provisioned tenant is rotated at the soft limit again (the watch knows its v1 is another key)', async function () {
    this.timeout(30_000);
    const events: WrapLimitEvent[] = [];
    env = await makeEnv(backend, {
      stores: { wrapLimits: { soft: 3, hard: 100 }, onWrapLimit: (e) => events.push(e) },
    });
    let s = env.stores.store('acme');
    await save(s, 1, 3);
    await primaryBecomes(s, 2);
    await env.stores.deprovisionTenant('acme');
    await env.stores.provisionTenant('acme');
    s = env.stores.store('acme');
    expect((await s.keys.status()).primary).to.equal(1);
    await save(s, 10, 3);
    await primaryBecomes(s, 2);
    expect(events.filter((e) => e.outcome === 'rotation_started')).to.have.length(2);
  });

  it('a store at schema 3 gets the wrap count when opened, set from its records and heads', async function () {
    this.timeout(30_000);
    env = await makeEnv(backend);
    const s = env.stores.store('acme');
    await save(s, 1, 3);
    await s.saveFeedback([fb('card-inv-1', 1)], { service: 'med-safety' });
    const job = await s.keys.rotate();
    await env.stores.waitForJob(job.id); // 4 heads under v2; the rows still say v1
    await save(s, 4, 2);
    expect(await wraps(s)).to.deep.equal({ 1: 4, 2: 6 });
    await env.stores.close();
    // What schema 3 left: no column, no counting triggers.
    const raw = await env.raw('acme');
    for (const [table, name] of [
      ['invocations', 'invocations_counts_wrap'],
      ['invocations', 'invocations_reseal_counts_wrap'],
      ['feedback', 'feedback_counts_wrap'],
      ['feedback', 'feedback_reseal_counts_wrap'],
      ['invocation_heads', 'invocation_heads_counts_wrap'],
      ['invocation_heads', 'invocation_heads_rewrap_counts_wrap'],
      ['feedback_heads', 'feedback_heads_counts_wrap'],
      ['feedback_heads', 'feedback_heads_rewrap_counts_wrap'],
    ] as const) {
      await raw.exec(
        backend === 'sqlite' ? `DROP TRIGGER ${name}` : `DROP TRIGGER ${name} ON ${raw.t(table)}`,
      );
    }
    await raw.exec(`ALTER TABLE ${raw.t('dek_versions')} DROP COLUMN wrap_count`);
    await raw.exec(`UPDATE ${raw.t('meta')} SET value = '3' WHERE key = 'schema'`);
    // Writes the older version made of records since deleted would not be known: a lower bound.
    const stores = await env.reopen();
    const again = stores.store('acme');
    // v1: the 3 + 1 rows sealed under it; v2: the 2 rows sealed under it + the 4 heads.
    expect(await wraps(again)).to.deep.equal({ 1: 4, 2: 6 });
    const [schema] = await raw.query<{ value: string }>(
      `SELECT value FROM ${raw.t('meta')} WHERE key = 'schema'`,
    );
    expect(schema?.value).to.equal('6');
    await save(again, 10, 1);
    expect(await wraps(again)).to.deep.equal({ 1: 4, 2: 7 });
  });

  it('at the soft limit the store rotates once by itself (audited, actor system, reason wrap_limit) and writes go on under the new version', async function () {
    this.timeout(30_000);
    const events: WrapLimitEvent[] = [];
    env = await makeEnv(backend, {
      stores: { wrapLimits: { soft: 5, hard: 100 }, onWrapLimit: (e) => events.push(e) },
    });
    const s = env.stores.store('acme');
    await save(s, 1, 4);
    expect((await s.keys.status()).primary).to.equal(1);
    // The 5th wrap and two more in flight with it: one rotation.
    await Promise.all(['inv-5', 'inv-6', 'inv-7'].map((id) => s.saveInvocation(invocation(id))));
    await primaryBecomes(s, 2);
    const status = await s.keys.status();
    expect(status.wrapLimits).to.deep.equal({ soft: 5, hard: 100 });
    // Told once the rotation is made (the job may already be done by then).
    for (let i = 0; i < 200 && events.length === 0; i += 1) {
      await new Promise((r) => setTimeout(r, 25));
    }
    const jobId = events[0]?.job ?? '';
    expect(jobId).to.match(/^rewrap\.acme\./);
    expect(await env.stores.waitForJob(jobId)).to.include({ status: 'done' });
    const rotations = (await s.audit.list()).filter((e) => e.type === 'key.rotate');
    expect(rotations).to.have.length(1);
    expect(rotations[0]).to.deep.include({ actor: 'system', outcome: 'success' });
    expect(rotations[0]?.detail).to.deep.include({ from: 1, to: 2, reason: 'wrap_limit' });
    expect(Number(rotations[0]?.detail?.wraps)).to.be.within(5, 7);
    expect(events.map((e) => e.outcome)).to.deep.equal(['rotation_started']);
    expect(events[0]).to.include({ tenant: 'acme', version: 1 });
    // Every record is wrapped once under v2 (re-wrapped by the job, or written under it).
    expect((await wraps(s))[2]).to.equal(7);
    await save(s, 8, 1);
    expect((await s.readInvocation('inv-8')).keyVersion).to.equal(2);
  });

  it('when no rotation can start, the hard limit refuses writes with WrapLimitError and stores nothing', async function () {
    this.timeout(30_000);
    env = await makeEnv(backend);
    await env.stores.provisionTenant('acme');
    await env.stores.close();
    const events: WrapLimitEvent[] = [];
    const stores: RegionStores = await env.reopen({
      keyProvider: refusingWraps(env.provider),
      wrapLimits: { soft: 5, hard: 8 },
      onWrapLimit: (e) => events.push(e),
    });
    const s = stores.store('acme');
    await save(s, 1, 7);
    // Written together, the batch that would pass 8 is refused (no write passes the limit).
    const results = await Promise.allSettled([
      s.saveInvocation(invocation('inv-8')),
      s.saveInvocation(invocation('inv-9')),
    ]);
    expect(results.filter((r) => r.status === 'fulfilled').length).to.be.at.most(1);
    for (const r of results) {
      if (r.status === 'rejected') {
        expect(asInstance(r.reason as Error, WrapLimitError).reason).to.equal('wrap_limit');
      }
    }
    const count = (await wraps(s))[1] ?? 0;
    expect(count).to.be.at.most(8);
    await save(s, 10, 8 - count);
    expect(await wraps(s)).to.deep.equal({ 1: 8 });
    const err = await rejection(s.saveInvocation(invocation('inv-30')));
    const refused = asInstance(err, WrapLimitError);
    expect(refused).to.be.instanceOf(KeyUnavailableError);
    expect(refused.reason).to.equal('wrap_limit');
    expect(refused).to.include({ version: 1, wraps: 8 });
    expect(refused.message).to.match(/DEK version 1 of tenant acme has made 8 of its 8/);
    const fbErr = await rejection(s.saveFeedback([fb('card-inv-1', 1)], { service: 'med-safety' }));
    expect(asInstance(fbErr, WrapLimitError).reason).to.equal('wrap_limit');
    // Nothing written past the limit; what was written still opens.
    expect(await s.listInvocations({ limit: 100 })).to.have.length(8);
    expect((await s.readInvocation('inv-1')).keyVersion).to.equal(1);
    expect(await wraps(s)).to.deep.equal({ 1: 8 });
    expect((await s.keys.status()).primary).to.equal(1);
    expect((await s.audit.list()).filter((e) => e.type === 'key.rotate')).to.have.length(0);
    // The rotation was tried once (the retry waits 30 s), each refusal reported.
    expect(events.filter((e) => e.outcome === 'rotation_failed')).to.have.length(1);
    expect(events.filter((e) => e.outcome === 'refused').length).to.be.at.least(2);
    expect(events.find((e) => e.outcome === 'rotation_failed')?.error).to.match(/provider/);
  });

  it('a write refused at the hard limit encrypts nothing under the exhausted DEK', async function () {
    this.timeout(30_000);
    env = await makeEnv(backend);
    await env.stores.provisionTenant('acme');
    await env.stores.close();
    const stores = await env.reopen({
      keyProvider: refusingWraps(env.provider),
      wrapLimits: { soft: 3, hard: 4 },
    });
    const s = stores.store('acme');
    await save(s, 1, 4);
    expect(await wraps(s)).to.deep.equal({ 1: 4 });
    const dek = watchDekEncryptions();
    try {
      for (let i = 10; i < 15; i += 1) {
        const err = await rejection(s.saveInvocation(invocation(`inv-${String(i)}`)));
        expect(asInstance(err, WrapLimitError).reason).to.equal('wrap_limit');
      }
      const fbErr = await rejection(
        s.saveFeedback([fb('card-inv-1', 1), fb('card-inv-2', 2)], { service: 'med-safety' }),
      );
      expect(asInstance(fbErr, WrapLimitError).reason).to.equal('wrap_limit');
    } finally {
      dek.stop();
    }
    // At most the first refusal sealed (it found the limit); the others were refused before.
    expect(dek.count).to.be.at.most(1);
    expect(await wraps(s)).to.deep.equal({ 1: 4 });
  });

  it('restoring a backup from before a version, then one holding it, keeps its highest count (the key history survives restores)', async function () {
    this.timeout(60_000);
    env = await makeEnv(backend);
    await env.stores.provisionTenant('acme');
    await env.stores.close();
    let down = false;
    const provider = env.provider;
    const stores = await env.reopen({
      wrapLimits: { soft: 11, hard: 12 },
      keyProvider: {
        ...provider,
        wrapDek: (...args: Parameters<KeyProvider['wrapDek']>) =>
          down
            ? Promise.reject(new KeyUnavailableError('provider', 'the provider is down'))
            : provider.wrapDek(...args),
      },
    });
    const s = stores.store('acme');
    await save(s, 1, 2);
    const b0 = await stores.backupTenant('acme', env.backupDir); // v1 only
    const job = await s.keys.rotate();
    await stores.waitForJob(job.id);
    await save(s, 3, 2);
    const b1 = await stores.backupTenant('acme', env.backupDir); // v2 at 4
    // No rotation can start any more: v2 runs up to its hard limit.
    down = true;
    const err = await rejection(save(s, 5, 20));
    expect(asInstance(err, WrapLimitError).reason).to.equal('wrap_limit');
    expect((await wraps(s))[2]).to.equal(12);
    for (let round = 0; round < 2; round += 1) {
      // b0 knows nothing of v2; b1 holds it at 4. The live history keeps its 12 across both.
      await stores.restoreTenant(b0.path, { tenant: 'acme' });
      await stores.restoreTenant(b1.path, { tenant: 'acme' });
      expect((await wraps(s))[2]).to.equal(12);
      const refused = await rejection(s.saveInvocation(invocation(`inv-r${String(round)}`)));
      expect(asInstance(refused, WrapLimitError).reason).to.equal('wrap_limit');
    }
  });

  it('a version an emergency rotation marked compromised does not come back through a restore of a backup from before it first', async function () {
    this.timeout(60_000);
    env = await makeEnv(backend);
    const s = env.stores.store('acme');
    await save(s, 1, 2);
    const b0 = await env.stores.backupTenant('acme', env.backupDir); // v1 only
    const j1 = await s.keys.rotate();
    await env.stores.waitForJob(j1.id);
    await save(s, 3, 2);
    const b1 = await env.stores.backupTenant('acme', env.backupDir); // v2 primary
    const j2 = await s.keys.rotate({ emergency: true });
    expect(await env.stores.waitForJob(j2.id)).to.include({ status: 'done' });
    // b0 holds no compromised key: restored. It knows nothing of v2; the history does.
    await env.stores.restoreTenant(b0.path, { tenant: 'acme' });
    const before = await s.keys.status();
    const err = await rejection(env.stores.restoreTenant(b1.path, { tenant: 'acme' }));
    const refused = asInstance(err, BackupError);
    expect(refused.reason).to.equal('dek_compromised');
    expect(refused.message).to.match(/DEK version 2 .*compromised/);
    expect((await s.keys.status()).versions).to.deep.equal(before.versions);
    // A backup of the restored store carries the history: a lost store restored from it
    // still refuses the compromised key.
    const b2 = await env.stores.backupTenant('acme', env.backupDir);
    await env.stores.close();
    const raw = await env.raw('acme');
    if (backend === 'sqlite') {
      await raw.close();
      for (const suffix of ['', '-wal', '-shm']) {
        fs.rmSync(`${path.join(env.dataDir, env.region, 'acme.sqlite')}${suffix}`, { force: true });
      }
    } else {
      await raw.exec(`DROP SCHEMA "${tenantSchemaName(env.schemaPrefix, 'acme')}" CASCADE`);
      await raw.close();
    }
    const stores = await env.reopen();
    await stores.restoreTenant(b2.path, { tenant: 'acme' });
    const again = await rejection(stores.restoreTenant(b1.path, { tenant: 'acme' }));
    expect(asInstance(again, BackupError).reason).to.equal('dek_compromised');
    expect((await stores.store('acme').readInvocation('inv-1')).keyVersion).to.equal(1);
  });

  it('a feedback batch with no room for all its new items is refused before sealing, once the key is known exhausted; one that fits still passes', async function () {
    this.timeout(30_000);
    env = await makeEnv(backend);
    await env.stores.provisionTenant('acme');
    await env.stores.close();
    const stores = await env.reopen({
      keyProvider: refusingWraps(env.provider),
      wrapLimits: { soft: 3, hard: 5 },
    });
    const s = stores.store('acme');
    await save(s, 1, 4);
    const dek = watchDekEncryptions();
    const sealed: number[] = [];
    const batch = async (minute: number) => {
      const from = dek.count;
      const err = await rejection(
        s.saveFeedback([fb('card-inv-1', minute), fb('card-inv-2', minute)], {
          service: 'med-safety',
        }),
      );
      expect(asInstance(err, WrapLimitError).reason).to.equal('wrap_limit');
      sealed.push(dek.count - from);
    };
    try {
      for (let i = 0; i < 3; i += 1) {
        await batch(i); // 2 new items, room for 1
      }
      // Room for one: stored, and the key stays known as near its limit.
      expect(await s.saveFeedback([fb('card-inv-1', 30)], { service: 'med-safety' })).to.include({
        stored: 1,
      });
      await batch(40);
    } finally {
      dek.stop();
    }
    // Only the first refusal sealed (it found the limit); the others were refused before.
    expect(sealed.slice(1)).to.deep.equal([0, 0, 0]);
    expect(await wraps(s)).to.deep.equal({ 1: 5 });
  });

  it('a retried feedback call made only of duplicates is answered at the hard limit, sealing nothing', async function () {
    this.timeout(30_000);
    env = await makeEnv(backend);
    await env.stores.provisionTenant('acme');
    await env.stores.close();
    const stores = await env.reopen({
      keyProvider: refusingWraps(env.provider),
      wrapLimits: { soft: 3, hard: 5 },
    });
    const s = stores.store('acme');
    await save(s, 1, 4);
    const first = await s.saveFeedback([fb('card-inv-1', 1)], { service: 'med-safety' });
    expect(await wraps(s)).to.deep.equal({ 1: 5 });
    // A write refused at the limit: the store now knows the key exhausted.
    const err = await rejection(s.saveInvocation(invocation('inv-50')));
    expect(asInstance(err, WrapLimitError).reason).to.equal('wrap_limit');
    const dek = watchDekEncryptions();
    try {
      const retry = await s.saveFeedback([fb('card-inv-1', 1), fb('card-inv-1', 1)], {
        service: 'med-safety',
      });
      expect(retry).to.deep.equal({ stored: 0, duplicates: 2, ids: [...first.ids, ...first.ids] });
    } finally {
      dek.stop();
    }
    expect(dek.count).to.equal(0);
    expect(await wraps(s)).to.deep.equal({ 1: 5 });
  });

  it('retried feedback items already stored are not sealed again (every encryption under a DEK is counted)', async function () {
    this.timeout(30_000);
    env = await makeEnv(backend);
    const s = env.stores.store('acme');
    await save(s, 1, 1);
    await s.saveFeedback([fb('card-inv-1', 1)], { service: 'med-safety' });
    const before = await wraps(s);
    const dek = watchDekEncryptions();
    try {
      for (let i = 0; i < 3; i += 1) {
        const r = await s.saveFeedback(
          Array.from({ length: 5 }, () => fb('card-inv-1', 1)),
          { service: 'med-safety' },
        );
        expect(r).to.include({ stored: 0, duplicates: 5 });
      }
    } finally {
      dek.stop();
    }
    expect(dek.count).to.equal(0);
    expect(await wraps(s)).to.deep.equal(before);
  });

  // SQLite only: a PostgreSQL BIGINT column holds numbers only.
  if (backend === 'sqlite') {
    it('a restore repairs a store whose wrap count is not a number (SQLite)', async function () {
      this.timeout(30_000);
      env = await makeEnv(backend);
      await save(env.stores.store('acme'), 1, 1);
      const backup = await env.stores.backupTenant('acme', env.backupDir);
      await env.stores.close();
      const raw = await env.raw('acme');
      await raw.exec(`UPDATE ${raw.t('dek_versions')} SET wrap_count = 'x'`);
      await raw.close();
      const stores = await env.reopen();
      await stores.restoreTenant(backup.path, { tenant: 'acme' });
      expect(await wraps(stores.store('acme'))).to.deep.equal({ 1: 1 });
    });
  }

  it('a rewrap job whose target version would pass the hard limit fails with a clear error', async function () {
    this.timeout(30_000);
    env = await makeEnv(backend);
    const s0 = env.stores.store('acme');
    await save(s0, 1, 6);
    await env.stores.close();
    const stores = await env.reopen({ wrapLimits: { soft: 3, hard: 4 } });
    const s = stores.store('acme');
    const job = await s.keys.rotate({ actor: 'op-1' });
    const done = await stores.waitForJob(job.id);
    expect(done.status).to.equal('failed');
    expect(done.error).to.match(/wrap_limit.*DEK version 2 of tenant acme has made 0 of its 4/);
    // Nothing moved, nothing destroyed: every record still opens under v1.
    expect(await wraps(s)).to.deep.equal({ 1: 6, 2: 0 });
    expect((await s.readInvocation('inv-6')).keyVersion).to.equal(1);
    const failure = (await s.audit.list()).find(
      (e) => e.type === 'key.rewrap' && e.outcome === 'failure',
    );
    expect(failure?.detail).to.deep.include({ job: job.id });
  });

  it('refuses bad wrap limits', async () => {
    env = await makeEnv(backend);
    for (const wrapLimits of [
      { soft: 8, hard: 8 },
      { soft: 0, hard: 8 },
      { soft: 1.5, hard: 8 },
      { hard: 2 ** 32 + 1 },
      { soft: 2 ** 32 - 1 },
    ]) {
      const err = await rejection(env.reopen({ wrapLimits }));
      expect(asInstance(err, InvalidInputError).field, JSON.stringify(wrapLimits)).to.match(
        /^wrapLimits\./,
      );
    }
  });
});

describe('data plane: the soft wrap limit watch', () => {
  it('tells a rotation refused because another is running or done (ConflictError) as rotation_running, not rotation_failed', async () => {
    const events: WrapLimitEvent[] = [];
    const watch = createWrapLimitWatch({
      limits: { soft: 5, hard: 10 },
      rotate: () => Promise.reject(new ConflictError('a rewrap job is still running: job-7')),
      tell: (e) => events.push(e),
    });
    watch.committed('acme', { version: 1, createdAt: '2026-01-01T00:00:00.000Z' }, 5);
    await watch.idle();
    expect(events.map((e) => [e.outcome, e.error])).to.deep.equal([
      ['rotation_running', 'a rewrap job is still running: job-7'],
    ]);
  });

  it('rotates a key again after the pause when it is primary at its limit again, and another key of the same number at once', async () => {
    let now = 0;
    const rotated: number[] = [];
    const events: WrapLimitEvent[] = [];
    const watch = createWrapLimitWatch({
      limits: { soft: 5, hard: 10 },
      rotate: (_tenant, version) => {
        rotated.push(version);
        return Promise.resolve({ id: `job-${String(rotated.length)}` });
      },
      tell: (e) => events.push(e),
      nowMs: () => now,
    });
    const v1 = { version: 1, createdAt: '2026-01-01T00:00:00.000Z' };
    watch.committed('acme', v1, 5);
    await watch.idle();
    watch.committed('acme', v1, 6); // in flight with the first: no second rotation
    watch.refused('acme', v1, 10);
    await watch.idle();
    expect(rotated).to.deep.equal([1]);
    // The same key still (or again: a restore) at its limit after the pause: rotated again.
    now = 30_001;
    watch.refused('acme', v1, 10);
    await watch.idle();
    expect(rotated).to.deep.equal([1, 1]);
    // A re-provisioned tenant's v1 is another key: rotated at once.
    watch.committed('acme', { version: 1, createdAt: '2026-02-01T00:00:00.000Z' }, 5);
    await watch.idle();
    expect(rotated).to.deep.equal([1, 1, 1]);
    expect(events.filter((e) => e.outcome === 'rotation_started')).to.have.length(3);
  });
});
