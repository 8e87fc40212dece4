import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { expect } from 'chai';
import { QueryTypes, Sequelize } from 'sequelize';
import {
  BackupError,
  KeyUnavailableError,
  RecordOpenError,
  keyringPath,
  readBackupManifest,
  tenantSchemaName,
} from '../../../tenants/data-plane.ts';
import type { BackupResult } from '../../../tenants/data-plane.ts';
import {
  PG_URL,
  asInstance,
  filesContaining,
  forEachBackend,
  invocation,
  makeEnv,
  rejection,
} from './helpers.ts';
import type { Env } from './helpers.ts';

async function backupError(p: Promise<unknown>): Promise<BackupError> {
  return asInstance(await rejection(p), BackupError);
}

function copyDir(from: string, to: string): string {
  fs.cpSync(from, to, { recursive: true });
  return to;
}

function rewriteManifest(dir: string, patch: (m: Record<string, unknown>) => void): void {
  const file = path.join(dir, 'manifest.json');
  const m = JSON.parse(fs.readFileSync(file, 'utf8')) as Record<string, unknown>;
  patch(m);
  fs.writeFileSync(file, JSON.stringify(m));
}

async function schemaExists(schema: string): Promise<boolean> {
  const db = new Sequelize(PG_URL ?? '', { dialect: 'postgres', logging: false });
  try {
    const rows = await db.query<{ n: string }>(
      'SELECT count(*) AS n FROM information_schema.schemata WHERE schema_name = :schema',
      { type: QueryTypes.SELECT, replacements: { schema } },
    );
    return Number(rows[0]?.n) > 0;
  } finally {
    await db.close();
  }
}

forEachBackend('tenants/ data plane: backup, restore, deprovision', (backend) => {
  let env: Env;
  let backup: BackupResult;
  beforeEach(async () => {
    env = await makeEnv(backend);
    const s = env.stores.store('acme');
    for (let i = 1; i <= 5; i += 1) {
      await s.saveInvocation(invocation(`inv-${i}`));
    }
    await s.saveFeedback(
      [{ card: 'card-inv-1', outcome: 'accepted', outcomeTimestamp: '2025-01-01T13:00:00Z' }],
      {
        service: 'med-safety',
      },
    );
    backup = await env.stores.backupTenant('acme', env.backupDir);
    await s.saveInvocation(invocation('inv-after-backup'));
  });
  afterEach(async () => {
    await env.close();
  });

  it('writes a snapshot, the wrapped DEKs and a manifest with checksums, never a plaintext key', () => {
    expect(fs.statSync(backup.path).mode & 0o777).to.equal(0o700);
    const names = fs.readdirSync(backup.path).sort();
    const storeName = backend === 'sqlite' ? 'store.sqlite' : 'store.json';
    expect(names).to.deep.equal(['deks.json', 'manifest.json', storeName].sort());
    for (const n of names) {
      expect(fs.statSync(path.join(backup.path, n)).mode & 0o777, n).to.equal(0o600);
    }
    const m = readBackupManifest(backup.path);
    expect(m).to.include({ tenant: 'acme', region: env.region, dialect: backend });
    expect(m.counts).to.deep.equal({
      invocations: 5,
      feedback: 1,
      auditEvents: backup.counts.auditEvents,
    });
    for (const f of m.files) {
      const data = fs.readFileSync(path.join(backup.path, f.name));
      expect(f.sha256).to.equal(crypto.createHash('sha256').update(data).digest('hex'));
    }
    const deks = JSON.parse(fs.readFileSync(path.join(backup.path, 'deks.json'), 'utf8'));
    expect(deks.deks).to.have.length(1);
    expect(deks.deks[0].wrapped.split('.')).to.have.length(5); // a JWE, not a key
    const keyring = JSON.parse(fs.readFileSync(keyringPath(env.keyDir, env.region), 'utf8'));
    for (const secret of [
      keyring.tenants.acme.jwk.k,
      ...keyring.keks.map((k: { jwk: { k: string } }) => k.jwk.k),
    ]) {
      expect(filesContaining(backup.path, secret)).to.deep.equal([]);
    }
  });

  it('restores exactly that tenant from its backup, readable while its keys exist', async () => {
    await env.stores.store('beta').saveInvocation(invocation('beta-1'));
    const result = await env.stores.restoreTenant(backup.path, { tenant: 'acme' });
    expect(result).to.include({ tenant: 'acme', region: env.region, keyAvailable: true });
    const s = env.stores.store('acme');
    expect((await s.listInvocations()).map((r) => r.id)).to.deep.equal([
      'inv-1',
      'inv-2',
      'inv-3',
      'inv-4',
      'inv-5',
    ]);
    expect((await s.readInvocation('inv-1')).feedback).to.have.length(1);
    expect((await s.readInvocation('inv-5')).secret.trace).to.deep.equal([
      { rule: 'r1', matched: 'PHI-trace' },
    ]);
    expect(await s.audit.verify()).to.include({ ok: true });
    expect((await s.audit.list()).map((e) => e.type)).to.include('backup.restored');
    expect((await env.stores.store('beta').readInvocation('beta-1')).id).to.equal('beta-1');
    // New records after a restore keep working (sequences and keys intact).
    expect((await s.saveInvocation(invocation('inv-6'))).keyVersion).to.equal(1);
  });

  it('backs up and restores records a scheduled rotation moved (their head rows come along)', async () => {
    const s = env.stores.store('acme');
    const job = await s.keys.rotate();
    expect(await env.stores.waitForJob(job.id)).to.include({ status: 'done', done: 7 });
    const rotated = await env.stores.backupTenant('acme', env.backupDir);
    await s.saveInvocation(invocation('inv-7'));
    await env.stores.restoreTenant(rotated.path, { tenant: 'acme' });
    const after = env.stores.store('acme');
    expect((await after.listInvocations()).map((r) => [r.id, r.keyVersion])).to.deep.equal([
      ['inv-after-backup', 2],
      ['inv-1', 2],
      ['inv-2', 2],
      ['inv-3', 2],
      ['inv-4', 2],
      ['inv-5', 2],
    ]);
    const rec = await after.readInvocation('inv-1');
    expect(rec).to.include({ keyVersion: 2 });
    expect(rec.feedback.map((f) => f.keyVersion)).to.deep.equal([2]);
    expect(rec.secret.trace).to.deep.equal([{ rule: 'r1', matched: 'PHI-trace' }]);
    expect((await after.keys.status()).versions.map((v) => [v.version, v.status])).to.deep.equal([
      [1, 'destroyed'],
      [2, 'primary'],
    ]);
  });

  it('refuses a backup of another tenant or region, a bad checksum, or a forged manifest; nothing changes', async () => {
    const s = env.stores.store('acme');
    const other = await makeEnv(backend, { region: 'us-east' });
    try {
      expect((await backupError(other.stores.restoreTenant(backup.path))).reason).to.equal(
        'wrong_region',
      );
      expect(
        (await backupError(env.stores.restoreTenant(backup.path, { region: 'us-east' }))).reason,
      ).to.equal('wrong_region');
    } finally {
      await other.close();
    }
    expect(
      (await backupError(env.stores.restoreTenant(backup.path, { tenant: 'beta' }))).reason,
    ).to.equal('wrong_tenant');

    const corrupted = copyDir(backup.path, path.join(env.dir, 'corrupted'));
    const storeFile = path.join(corrupted, backend === 'sqlite' ? 'store.sqlite' : 'store.json');
    const bytes = fs.readFileSync(storeFile);
    bytes[bytes.length - 10] = (bytes[bytes.length - 10] ?? 0) ^ 1;
    fs.writeFileSync(storeFile, bytes);
    expect((await backupError(env.stores.restoreTenant(corrupted))).reason).to.equal('checksum');

    // Forged: manifest and deks.json claim tenant beta, checksums recomputed; the snapshot says acme.
    const forged = copyDir(backup.path, path.join(env.dir, 'forged'));
    const deksFile = path.join(forged, 'deks.json');
    const deks = JSON.parse(fs.readFileSync(deksFile, 'utf8'));
    deks.tenant = 'beta';
    fs.writeFileSync(deksFile, JSON.stringify(deks));
    const digest = crypto.createHash('sha256').update(fs.readFileSync(deksFile)).digest('hex');
    rewriteManifest(forged, (m) => {
      m.tenant = 'beta';
      for (const f of m.files as Array<{ name: string; sha256: string; bytes: number }>) {
        if (f.name === 'deks.json') {
          f.sha256 = digest;
          f.bytes = fs.statSync(deksFile).size;
        }
      }
    });
    // Beta holds no key in this region: the MAC cannot be checked, so it is refused as such;
    // restored without authentication, the snapshot itself still says acme.
    expect((await backupError(env.stores.restoreTenant(forged))).reason).to.equal(
      'key_unavailable',
    );
    expect(
      (await backupError(env.stores.restoreTenant(forged, { allowUnauthenticated: true }))).reason,
    ).to.equal('wrong_tenant');

    const broken = copyDir(backup.path, path.join(env.dir, 'broken'));
    rewriteManifest(broken, (m) => {
      m.extra = 'x';
    });
    expect((await backupError(env.stores.restoreTenant(broken))).reason).to.equal('manifest');
    // A name that is no backup at all says so (not "manifest.json is missing or not JSON").
    const none = await backupError(env.stores.restoreTenant(path.join(env.dir, 'no-such-backup')));
    expect(none.reason).to.equal('manifest');
    expect(none.message).to.include("no backup no-such-backup in this region's backup folder");

    // The live store is untouched by every refusal.
    expect((await s.readInvocation('inv-after-backup')).id).to.equal('inv-after-backup');
    expect(await env.stores.listTenants()).to.deep.equal(['acme']);
  });

  it('crypto-shreds on deprovision: no key material left, and the old backup restores unreadable', async () => {
    const keyringFile = keyringPath(env.keyDir, env.region);
    const ring = JSON.parse(fs.readFileSync(keyringFile, 'utf8'));
    const tenantSecret: string = ring.tenants.acme.jwk.k;
    const wrappedDeks: string[] = JSON.parse(
      fs.readFileSync(path.join(backup.path, 'deks.json'), 'utf8'),
    ).deks.map((d: { wrapped: string }) => d.wrapped);

    const result = await env.stores.deprovisionTenant('acme');
    expect(result).to.deep.equal({
      tenant: 'acme',
      region: env.region,
      tenantKeyDestroyed: true,
      dekVersionsDestroyed: 1,
      storeDeleted: true,
    });

    const after = JSON.parse(fs.readFileSync(keyringFile, 'utf8'));
    expect(after.tenants).to.not.have.property('acme');
    const needles = [
      tenantSecret,
      Buffer.from(tenantSecret, 'base64url'),
      Buffer.from(tenantSecret, 'base64url').toString('hex'),
      Buffer.from(tenantSecret, 'base64url').toString('base64'),
      ...wrappedDeks,
    ];
    for (const needle of needles) {
      expect(filesContaining(env.dataDir, needle)).to.deep.equal([]);
      expect(filesContaining(env.keyDir, needle)).to.deep.equal([]);
    }
    if (backend === 'sqlite') {
      // Only the region's keyring binding (no tenant data) is left in the region's folder.
      expect(fs.readdirSync(path.join(env.dataDir, env.region))).to.deep.equal([
        '.keyring-binding.json',
      ]);
    } else {
      expect(await schemaExists(tenantSchemaName(env.schemaPrefix, 'acme'))).to.equal(false);
    }

    // A deprovisioned tenant is not silently re-created by a late call.
    const late = await rejection(env.stores.store('acme').saveInvocation(invocation('late')));
    expect(asInstance(late, KeyUnavailableError).reason).to.equal('tenant_key_destroyed');
    expect(await env.stores.listTenants()).to.deep.equal([]);

    // Its manifest's MAC key was wrapped under the destroyed key: the MAC cannot be checked, so
    // the restore is refused unless asked for without authentication.
    expect(
      (await backupError(env.stores.restoreTenant(backup.path, { tenant: 'acme' }))).reason,
    ).to.equal('key_unavailable');
    expect(await env.stores.listTenants()).to.deep.equal([]);
    // Restoring the earlier backup gives a store whose records fail to open, loudly.
    const restored = await env.stores.restoreTenant(backup.path, {
      tenant: 'acme',
      allowUnauthenticated: true,
    });
    expect(restored).to.include({
      keyAvailable: false,
      keyUnavailableReason: 'tenant_key_destroyed',
      authenticated: false,
    });
    const s = env.stores.store('acme');
    expect((await s.listInvocations()).map((r) => r.id)).to.have.length(5); // metadata only
    for (const id of ['inv-1', 'inv-5']) {
      const err = await rejection(s.readInvocation(id));
      expect(asInstance(err, RecordOpenError).reason).to.equal('key_unavailable');
      expect(
        asInstance(asInstance(err, RecordOpenError).cause, KeyUnavailableError).reason,
      ).to.equal('tenant_key_destroyed');
    }
    expect(await rejection(s.saveInvocation(invocation('inv-9')))).to.be.instanceOf(
      KeyUnavailableError,
    );
    const failures = (await s.audit.list()).filter(
      (e) => e.type === 'key.unwrap' && e.outcome === 'failure',
    );
    expect(failures.length).to.be.greaterThan(0);

    // Even after the tenant is provisioned again (new tenant key), the old backup stays dead.
    await env.stores.deprovisionTenant('acme');
    await env.stores.provisionTenant('acme');
    await s.saveInvocation(invocation('fresh-1'));
    expect((await s.readInvocation('fresh-1')).id).to.equal('fresh-1');
    expect(
      (await backupError(env.stores.restoreTenant(backup.path, { tenant: 'acme' }))).reason,
    ).to.equal('key_unavailable');
    await env.stores.restoreTenant(backup.path, { tenant: 'acme', allowUnauthenticated: true });
    const again = await rejection(env.stores.store('acme').readInvocation('inv-1'));
    expect(again).to.be.instanceOf(RecordOpenError);
  });
});

if (PG_URL) {
  describe('tenants/ data plane: backups across dialects', () => {
    it('refuses a SQLite backup in a PostgreSQL region (wrong_dialect)', async () => {
      const lite = await makeEnv('sqlite');
      const pg = await makeEnv('postgres');
      try {
        await lite.stores.store('acme').saveInvocation(invocation('inv-1'));
        const b = await lite.stores.backupTenant('acme', lite.backupDir);
        expect((await backupError(pg.stores.restoreTenant(b.path))).reason).to.equal(
          'wrong_dialect',
        );
      } finally {
        await lite.close();
        await pg.close();
      }
    });
  });
}
