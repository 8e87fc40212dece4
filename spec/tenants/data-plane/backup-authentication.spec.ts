/**
 * Backup manifests are authenticated (format 2): an HMAC-SHA256 over the canonical JSON of the
 * whole manifest (every file's sha256 included), under a fresh key the region's provider wraps
 * for the tenant. Whoever can write to a backup folder but cannot use the provider cannot get an
 * altered backup restored: not a snapshot cut short with its manifest rewritten to match, not a
 * changed field, not another tenant's backup relabelled, not a manifest stripped of its MAC
 * (unless the operator restores it explicitly without authentication).
 */
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { expect } from 'chai';
import { QueryTypes, Sequelize } from 'sequelize';
import {
  BackupError,
  canonicalJson,
  KeyUnavailableError,
  tenantSchemaName,
} from '../../../tenants/data-plane.ts';
import type { BackupResult, KeyProvider } from '../../../tenants/data-plane.ts';
import {
  copyDir,
  downgradeToFormat1,
  fixChecksum,
  patchManifest,
  readManifest,
  resign,
  truncateLikeAnAttacker,
} from './backup-tamper.ts';
import { PG_URL, asInstance, forEachBackend, invocation, makeEnv, rejection } from './helpers.ts';
import type { Env } from './helpers.ts';

async function refusal(p: Promise<unknown>): Promise<BackupError> {
  return asInstance(await rejection(p), BackupError);
}

const AFTER = ['inv-1', 'inv-2', 'inv-3', 'inv-4', 'inv-5', 'inv-after-backup'];

forEachBackend('tenants/ data plane: authenticated backup manifests', (backend) => {
  let env: Env;
  let backup: BackupResult;
  let n = 0;
  beforeEach(async () => {
    env = await makeEnv(backend);
    const s = env.stores.store('acme');
    for (let i = 1; i <= 5; i += 1) {
      await s.saveInvocation(invocation(`inv-${i}`));
    }
    await s.saveFeedback(
      [{ card: 'card-inv-1', outcome: 'accepted', outcomeTimestamp: '2025-01-01T13:00:00Z' }],
      { service: 'med-safety' },
    );
    await s.readInvocation('inv-2', { actor: 'auditor' });
    await s.audit.append({ type: 'test.one', outcome: 'success' });
    backup = await env.stores.backupTenant('acme', env.backupDir);
    await s.saveInvocation(invocation('inv-after-backup'));
    // Another tenant of the region, with its own key and store.
    await env.stores.store('beta').saveInvocation(invocation('beta-1'));
  });
  afterEach(async () => {
    await env.close();
  });

  const tampered = (): string => {
    n += 1;
    return copyDir(backup.path, path.join(env.dir, `tampered-${String(n)}`));
  };

  /** The live stores are exactly what they were before the refused restore; nothing staged. */
  async function expectLiveUntouched(): Promise<void> {
    const s = env.stores.store('acme');
    expect((await s.listInvocations()).map((r) => r.id).sort()).to.deep.equal([...AFTER].sort());
    expect(await s.audit.verify()).to.include({ ok: true });
    expect((await s.audit.list()).map((e) => e.type)).to.not.include('backup.restored');
    expect((await env.stores.store('beta').listInvocations()).map((r) => r.id)).to.deep.equal([
      'beta-1',
    ]);
    expect((await env.stores.listTenants()).sort()).to.deep.equal(['acme', 'beta']);
    if (backend === 'sqlite') {
      const left = fs
        .readdirSync(path.join(env.dataDir, env.region))
        .filter((f) => f.includes('.restore-'));
      expect(left, 'staged copies left behind').to.deep.equal([]);
    } else {
      const db = new Sequelize(PG_URL ?? '', {
        dialect: 'postgres',
        logging: false,
        pool: { max: 1 },
      });
      try {
        const live = tenantSchemaName(env.schemaPrefix, 'acme');
        const rows = await db.query<{ schema_name: string }>(
          'SELECT schema_name FROM information_schema.schemata WHERE left(schema_name, :n) = :p',
          { type: QueryTypes.SELECT, replacements: { n: live.length + 2, p: `${live}_r` } },
        );
        expect(rows, 'staging schemas left behind').to.deep.equal([]);
      } finally {
        await db.close();
      }
    }
  }

  /** The `backup.restored` event the restore appended to the tenant's chain. */
  async function restoredEvent(tenant = 'acme') {
    const events = await env.stores.store(tenant).audit.list({ limit: 10_000 });
    return events.filter((e) => e.type === 'backup.restored').pop();
  }

  it('writes a format-2 manifest: a backup id, a MAC key wrapped by the provider for the tenant, and an HMAC-SHA256 over everything else', async () => {
    const m = readManifest(backup.path);
    expect(m.format).to.equal('cellcds-tenant-backup/2');
    expect(m.backupId).to.match(/^[0-9a-f]{32}$/);
    const macKey = m.macKey as { wrapped: string; kekVersion: number };
    expect(macKey.kekVersion).to.equal(1);
    expect(macKey.wrapped.split('.')).to.have.length(5); // a JWE, not a key
    expect(m.mac).to.match(/^[0-9a-f]{64}$/);
    // The key the provider unwraps (bound to purpose, tenant, region and backup id) is the MAC's.
    const key = await env.provider.unwrapDek(
      'acme',
      macKey.wrapped,
      `cellcds-backup-mac/2|acme|${env.region}|${String(m.backupId)}`,
    );
    const covered: Record<string, unknown> = { ...m };
    delete covered.mac;
    const mac = crypto.createHmac('sha256', key).update(canonicalJson(covered)).digest('hex');
    expect(mac).to.equal(m.mac);
    // Not a DEK's wrap: the same wrap does not open as tenant beta's, nor with another purpose.
    for (const [tenant, aad] of [
      ['beta', `cellcds-backup-mac/2|beta|${env.region}|${String(m.backupId)}`],
      ['acme', `${env.region}|acme|dek|1`],
    ] as const) {
      expect(
        asInstance(
          await rejection(env.provider.unwrapDek(tenant, macKey.wrapped, aad)),
          KeyUnavailableError,
        ).reason,
      ).to.equal('unwrap_failed');
    }
  });

  it('restores a genuine backup, authenticated, and records that in backup.restored', async () => {
    const result = await env.stores.restoreTenant(backup.path, { tenant: 'acme' });
    expect(result).to.include({ tenant: 'acme', authenticated: true, keyAvailable: true });
    expect(result.backupCreatedAt).to.equal(backup.createdAt);
    expect(result.counts.invocations).to.equal(5);
    expect((await restoredEvent())?.detail).to.deep.include({ authenticated: true });
    expect((await env.stores.store('acme').readInvocation('inv-5')).id).to.equal('inv-5');
  });

  it('verifies a manifest serialized differently (whitespace, member order): the MAC is over canonical JSON', async () => {
    const dir = tampered();
    const m = readManifest(dir);
    const reordered = Object.fromEntries(Object.entries(m).reverse());
    fs.writeFileSync(path.join(dir, 'manifest.json'), JSON.stringify(reordered, null, 4));
    const result = await env.stores.restoreTenant(dir, { tenant: 'acme' });
    expect(result.authenticated).to.equal(true);
  });

  it('refuses a snapshot cut short consistently with its manifest rewritten to match (sha256, counts, audit head): manifest_signature, live store untouched', async () => {
    const dir = tampered();
    const counts = await truncateLikeAnAttacker(backend, dir, {
      invocations: ['inv-4', 'inv-5'],
      fromEventType: 'record.read',
    });
    expect(counts.invocations).to.equal(3);
    const err = await refusal(env.stores.restoreTenant(dir, { tenant: 'acme' }));
    expect(err.reason).to.equal('manifest_signature');
    expect(err.message).to.not.match(/PHI/);
    expect(
      (await refusal(env.stores.restoreTenant(dir, { tenant: 'acme', allowUnauthenticated: true })))
        .reason,
    ).to.equal('manifest_signature');
    await expectLiveUntouched();
    // Only the MAC stood in the way: authenticated again (which takes the provider), the same
    // folder passes every other check and restores the truncated store.
    await resign(env.provider, dir);
    const result = await env.stores.restoreTenant(dir, { tenant: 'acme' });
    expect(result.counts.invocations).to.equal(3);
  });

  const fieldEdits: Array<[string, (m: Record<string, unknown>) => void, string]> = [
    ['createdAt', (m) => (m.createdAt = '2031-01-01T00:00:00.000Z'), 'manifest_signature'],
    ['backupId', (m) => (m.backupId = 'a'.repeat(32)), 'manifest_signature'],
    [
      'counts.invocations',
      (m) => ((m.counts as { invocations: number }).invocations -= 1),
      'manifest_signature',
    ],
    [
      'counts.feedback',
      (m) => ((m.counts as { feedback: number }).feedback += 1),
      'manifest_signature',
    ],
    [
      'counts.auditEvents',
      (m) => ((m.counts as { auditEvents: number }).auditEvents -= 1),
      'manifest_signature',
    ],
    ['auditHead.seq', (m) => ((m.auditHead as { seq: number }).seq -= 1), 'manifest_signature'],
    [
      'auditHead.hash',
      (m) => ((m.auditHead as { hash: string }).hash = 'f'.repeat(64)),
      'manifest_signature',
    ],
    [
      'dekVersions[0].status',
      (m) => ((m.dekVersions as Array<{ status: string }>)[0]!.status = 'retired'),
      'manifest_signature',
    ],
    [
      'dekVersions[0].kekVersion',
      (m) => ((m.dekVersions as Array<{ kekVersion: number }>)[0]!.kekVersion = 2),
      'manifest_signature',
    ],
    [
      'macKey.kekVersion',
      (m) => ((m.macKey as { kekVersion: number }).kekVersion = 2),
      'manifest_signature',
    ],
    [
      'macKey.wrapped',
      (m) => {
        const k = m.macKey as { wrapped: string };
        const parts = k.wrapped.split('.');
        const ct = Buffer.from(parts[3] ?? '', 'base64url');
        ct[0] = (ct[0] ?? 0) ^ 1;
        parts[3] = ct.toString('base64url');
        k.wrapped = parts.join('.');
      },
      'manifest_signature',
    ],
    [
      'mac',
      (m) => (m.mac = String(m.mac).replace(/^./, (c) => (c === '0' ? '1' : '0'))),
      'manifest_signature',
    ],
    // Checked before the MAC (they refuse whatever the MAC says):
    ['region', (m) => (m.region = 'us-east'), 'wrong_region'],
    [
      'dialect',
      (m) => (m.dialect = backend === 'sqlite' ? 'postgres' : 'sqlite'),
      'manifest', // the file set no longer matches the dialect
    ],
    [
      'files[0].sha256',
      (m) => ((m.files as Array<{ sha256: string }>)[0]!.sha256 = '0'.repeat(64)),
      'checksum',
    ],
  ];
  for (const [field, edit, reason] of fieldEdits) {
    it(`refuses a manifest with ${field} changed (${reason})`, async () => {
      const dir = tampered();
      patchManifest(dir, edit);
      const err = await refusal(env.stores.restoreTenant(dir, { tenant: 'acme' }));
      expect(err.reason, err.message).to.equal(reason);
      await expectLiveUntouched();
    });
  }

  const stripped: Array<[string, (dir: string) => void]> = [
    [
      'the MAC removed',
      (dir) => {
        patchManifest(dir, (m) => delete m.mac);
      },
    ],
    [
      'the MAC key removed',
      (dir) => {
        patchManifest(dir, (m) => delete m.macKey);
      },
    ],
    ['the format downgraded to 1 (an older release wrote it)', downgradeToFormat1],
  ];
  for (const [name, strip] of stripped) {
    it(`refuses a manifest with ${name} (unauthenticated), and restores it only with allowUnauthenticated, recorded`, async () => {
      const dir = tampered();
      strip(dir);
      const err = await refusal(env.stores.restoreTenant(dir, { tenant: 'acme' }));
      expect(err.reason).to.equal('unauthenticated');
      expect(err.message).to.include('allowUnauthenticated');
      await expectLiveUntouched();
      const result = await env.stores.restoreTenant(dir, {
        tenant: 'acme',
        allowUnauthenticated: true,
      });
      expect(result).to.include({ authenticated: false, keyAvailable: true });
      expect((await restoredEvent())?.detail).to.deep.include({ authenticated: false });
      expect((await env.stores.store('acme').listInvocations()).map((r) => r.id)).to.deep.equal(
        AFTER.slice(0, 5),
      );
    });
  }

  it('refuses a format-1 manifest that still carries MAC members (manifest)', async () => {
    const dir = tampered();
    patchManifest(dir, (m) => (m.format = 'cellcds-tenant-backup/1'));
    expect((await refusal(env.stores.restoreTenant(dir, { tenant: 'acme' }))).reason).to.equal(
      'manifest',
    );
  });

  it("refuses a backup of tenant acme relabelled as tenant beta (manifest and deks.json), even with allowUnauthenticated; beta's store untouched", async () => {
    const dir = tampered();
    const deksFile = path.join(dir, 'deks.json');
    const deks = JSON.parse(fs.readFileSync(deksFile, 'utf8')) as { tenant: string };
    deks.tenant = 'beta';
    fs.writeFileSync(deksFile, JSON.stringify(deks));
    fixChecksum(dir, 'deks.json');
    patchManifest(dir, (m) => (m.tenant = 'beta'));
    for (const opts of [{ tenant: 'beta' }, {}, { tenant: 'beta', allowUnauthenticated: true }]) {
      const err = await refusal(env.stores.restoreTenant(dir, opts));
      expect(err.reason, JSON.stringify(opts)).to.equal('manifest_signature');
    }
    await expectLiveUntouched();
  });

  it('refuses a backup relabelled as a tenant with no key in the region (key_unavailable); without authentication the snapshot still says acme (wrong_tenant)', async () => {
    const dir = tampered();
    const deksFile = path.join(dir, 'deks.json');
    const deks = JSON.parse(fs.readFileSync(deksFile, 'utf8')) as { tenant: string };
    deks.tenant = 'gamma';
    fs.writeFileSync(deksFile, JSON.stringify(deks));
    fixChecksum(dir, 'deks.json');
    patchManifest(dir, (m) => (m.tenant = 'gamma'));
    expect((await refusal(env.stores.restoreTenant(dir))).reason).to.equal('key_unavailable');
    expect(
      (await refusal(env.stores.restoreTenant(dir, { allowUnauthenticated: true }))).reason,
    ).to.equal('wrong_tenant');
    await expectLiveUntouched();
  });

  it('refuses the backup of a crypto-shredded tenant (key_unavailable) unless restored without authentication: records stay unreadable', async () => {
    await env.stores.deprovisionTenant('acme');
    const err = await refusal(env.stores.restoreTenant(backup.path, { tenant: 'acme' }));
    expect(err.reason).to.equal('key_unavailable');
    expect(err.message).to.include('tenant_key_destroyed');
    expect(await env.stores.listTenants()).to.deep.equal(['beta']);
    const result = await env.stores.restoreTenant(backup.path, {
      tenant: 'acme',
      allowUnauthenticated: true,
    });
    expect(result).to.include({ authenticated: false, keyAvailable: false });
    expect((await restoredEvent())?.detail).to.deep.include({ authenticated: false });
  });

  it('restores a backup after a KEK rotation (its MAC key stays wrapped under the retired KEK); later backups use the new KEK', async () => {
    const job = await env.stores.rotateKek({ actor: 'spec' });
    expect(await env.stores.waitForJob(job.id)).to.include({ status: 'done' });
    const keks = (await env.provider.describe()).keks.map((k) => [k.version, k.status]);
    expect(keks).to.deep.equal([
      [1, 'retired'],
      [2, 'primary'],
    ]);
    expect((readManifest(backup.path).macKey as { kekVersion: number }).kekVersion).to.equal(1);
    const result = await env.stores.restoreTenant(backup.path, { tenant: 'acme' });
    expect(result).to.include({ authenticated: true, keyAvailable: true });
    // The restored store holds the DEKs as they were wrapped then (KEK 1): they still open.
    expect((await env.stores.store('acme').readInvocation('inv-3')).id).to.equal('inv-3');

    const later = await env.stores.backupTenant('acme', env.backupDir);
    expect((readManifest(later.path).macKey as { kekVersion: number }).kekVersion).to.equal(2);
    expect((await env.stores.restoreTenant(later.path, { tenant: 'acme' })).authenticated).to.equal(
      true,
    );
  });

  it('restores only the bytes the manifest vouches for: a file replaced after its checksum was checked is refused (checksum)', async () => {
    const storeName = backend === 'sqlite' ? 'store.sqlite' : 'store.json';
    for (const name of ['deks.json', storeName]) {
      const dir = tampered();
      const file = path.join(dir, name);
      // The same content in other bytes (JSON re-serialized; a SQLite file with a byte of its
      // unused tail changed), put in place while the restore checks the manifest's MAC: after
      // readBackupManifest compared the checksums, before the files are staged.
      const swapped =
        name === 'store.sqlite'
          ? (() => {
              const b = fs.readFileSync(file);
              b[b.length - 1] = (b[b.length - 1] ?? 0) ^ 1;
              return b;
            })()
          : Buffer.from(JSON.stringify(JSON.parse(fs.readFileSync(file, 'utf8')), null, 1));
      const swapping: KeyProvider = {
        ...env.provider,
        unwrapDek: async (tenant, wrapped, aad) => {
          if (aad.startsWith('cellcds-backup-mac/2|')) {
            fs.writeFileSync(file, swapped);
          }
          return env.provider.unwrapDek(tenant, wrapped, aad);
        },
      };
      const stores = await env.reopen({ keyProvider: swapping });
      const err = await refusal(stores.restoreTenant(dir, { tenant: 'acme' }));
      expect(err.reason, `${name}: ${err.message}`).to.equal('checksum');
      await stores.close();
      await expectLiveUntouched();
    }
  });

  it('restores an older genuine backup of the same tenant (point-in-time restore, by design); the result carries its time', async () => {
    const newer = await env.stores.backupTenant('acme', env.backupDir);
    expect(newer.createdAt >= backup.createdAt).to.equal(true);
    const result = await env.stores.restoreTenant(backup.path, { tenant: 'acme' });
    expect(result).to.include({ authenticated: true, backupCreatedAt: backup.createdAt });
    expect(result.counts.invocations).to.equal(5);
  });
});
