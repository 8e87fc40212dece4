/**
 * Restores through the admin API refuse a backup whose manifest does not authenticate (422 with
 * the reason, audited), and restore one that cannot be authenticated (format 1) only when the
 * operator asks for it explicitly (`allowUnauthenticated`, recorded). Real app, real keyring,
 * SQLite and (with CELLCDS_TEST_PG_URL) PostgreSQL.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { expect } from 'chai';
import request from 'supertest';
import { createSpecDatabase, regionEnv, type SpecDatabase } from '../helpers/pg-region.ts';
import { buildTestApp, type TestApp } from '../helpers/test-app.ts';
import {
  copyDir,
  downgradeToFormat1,
  readManifest,
  truncateLikeAnAttacker,
} from '../tenants/data-plane/backup-tamper.ts';
import { invocation } from '../tenants/data-plane/helpers.ts';
import type { BackendName } from '../tenants/data-plane/helpers.ts';

const PG_URL = process.env.CELLCDS_TEST_PG_URL;
const MARKER = 'Qwertyplanted';
const TENANT = 'hosp-a';

const backends: BackendName[] = PG_URL ? ['sqlite', 'postgres'] : ['sqlite'];

for (const backend of backends) {
  describe(`server: restores of authenticated backups through the admin API [${backend}]`, function () {
    this.timeout(60_000);
    let t: TestApp;
    let dir: string;
    let db: SpecDatabase | undefined;
    let n = 0;
    const op = (r: request.Test) => r.set('authorization', `Bearer ${t.adminToken}`);

    before(async () => {
      dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cellcds-backup-auth-'));
      const env: Record<string, string> = { CELLCDS_SEED_DEMO: 'false' };
      if (backend === 'postgres') {
        db = await createSpecDatabase('backup');
        Object.assign(env, regionEnv(dir, db.url));
      }
      t = await buildTestApp(env);
      await t.addTenant(TENANT);
    });
    after(async () => {
      await t.close();
      await db?.drop();
      fs.rmSync(dir, { recursive: true, force: true });
    });

    /** A fresh tenant store of 4 records (one read, audited), backed up; then one more record. */
    async function freshBackup(): Promise<{ path: string; createdAt: string }> {
      n += 1;
      const s = t.deps.stores.store(TENANT);
      for (let i = 1; i <= 4; i += 1) {
        await s.saveInvocation(invocation(`r${String(n)}-inv-${String(i)}`, MARKER));
      }
      await s.readInvocation(`r${String(n)}-inv-2`, { actor: 'auditor' });
      const res = await op(request(t.app).post(`/admin/tenants/${TENANT}/backups`));
      expect(res.status, JSON.stringify(res.body)).to.equal(201);
      await s.saveInvocation(invocation(`r${String(n)}-inv-9`, MARKER));
      return res.body as { path: string; createdAt: string };
    }

    const rel = (p: string) => path.relative(t.deps.backupDir, p);
    const restore = (body: Record<string, unknown>) =>
      op(request(t.app).post('/admin/restores')).send({ tenant: TENANT, ...body });
    const liveIds = async () =>
      (await t.deps.stores.store(TENANT).listInvocations({ limit: 1000 })).map((r) => r.id).sort();
    async function lastRestoreAudit(): Promise<Record<string, unknown> | undefined> {
      const res = await op(request(t.app).get('/admin/audit')).query({
        type: 'restore.tenant',
        tenant: TENANT,
      });
      expect(res.status).to.equal(200);
      return (res.body.events as Array<Record<string, unknown>>).pop();
    }

    it('restores a genuine backup: 200, authenticated', async () => {
      const b = await freshBackup();
      const res = await restore({ backup: rel(b.path) });
      expect(res.status, JSON.stringify(res.body)).to.equal(200);
      expect(res.body).to.include({
        tenant: TENANT,
        authenticated: true,
        keyAvailable: true,
        backupCreatedAt: b.createdAt,
      });
      expect((await lastRestoreAudit())?.detail).to.deep.include({ authenticated: true });
    });

    it('refuses a snapshot cut short with its manifest rewritten to match: 422 manifest_signature, audited, nothing changed, no PHI or key material in the answer', async () => {
      const b = await freshBackup();
      const before = await liveIds();
      const forged = copyDir(b.path, path.join(t.deps.backupDir, `forged-${String(n)}`));
      await truncateLikeAnAttacker(backend, forged, {
        invocations: [`r${String(n)}-inv-3`, `r${String(n)}-inv-4`],
        fromEventType: 'record.read',
      });
      const res = await restore({ backup: rel(forged) });
      expect(res.status, JSON.stringify(res.body)).to.equal(422);
      expect(res.body).to.include({ error: 'unprocessable', reason: 'manifest_signature' });
      expect(res.body.message).to.match(/^backup refused \(manifest_signature\): /);
      const m = readManifest(forged);
      const text = JSON.stringify(res.body);
      for (const secret of [MARKER, String(m.mac), (m.macKey as { wrapped: string }).wrapped]) {
        expect(text).to.not.include(secret);
      }
      expect(await liveIds()).to.deep.equal(before);
      expect(await lastRestoreAudit()).to.deep.include({
        outcome: 'failure',
        detail: { backup: path.basename(forged), reason: 'manifest_signature' },
      });
      // Asking for an unauthenticated restore does not let a MAC that fails through.
      const again = await restore({ backup: rel(forged), allowUnauthenticated: true });
      expect(again.status).to.equal(422);
      expect(again.body.reason).to.equal('manifest_signature');
      expect(await liveIds()).to.deep.equal(before);
    });

    it('refuses a format-1 manifest (422 unauthenticated) and restores it with allowUnauthenticated: true, recorded in the answer and the audit', async () => {
      const b = await freshBackup();
      const before = await liveIds();
      const old = copyDir(b.path, path.join(t.deps.backupDir, `format1-${String(n)}`));
      downgradeToFormat1(old);
      const res = await restore({ backup: rel(old) });
      expect(res.status, JSON.stringify(res.body)).to.equal(422);
      expect(res.body).to.include({ error: 'unprocessable', reason: 'unauthenticated' });
      expect(res.body.message).to.include('allowUnauthenticated');
      expect(await liveIds()).to.deep.equal(before);
      expect((await lastRestoreAudit())?.detail).to.deep.include({ reason: 'unauthenticated' });

      const ok = await restore({ backup: rel(old), allowUnauthenticated: true });
      expect(ok.status, JSON.stringify(ok.body)).to.equal(200);
      expect(ok.body).to.include({ authenticated: false, keyAvailable: true });
      expect(await lastRestoreAudit()).to.deep.include({
        outcome: 'success',
        detail: {
          backupCreatedAt: b.createdAt,
          keyAvailable: true,
          authenticated: false,
          allowUnauthenticated: true,
        },
      });
      const chain = await t.deps.stores.store(TENANT).audit.list({ limit: 10_000 });
      expect(chain.filter((e) => e.type === 'backup.restored').pop()?.detail).to.deep.include({
        authenticated: false,
      });
    });

    it('answers 400 for an allowUnauthenticated that is not a boolean', async () => {
      const res = await restore({ backup: 'whatever', allowUnauthenticated: 'yes' });
      expect(res.status).to.equal(400);
      expect(res.body).to.include({ error: 'invalid_request', field: 'allowUnauthenticated' });
    });
  });
}
