/**
 * Tenant ids are never reused. Deprovisioning (crypto-shredding) retires the id in the
 * transaction that removes the registry entry; registering it again is refused (409 naming
 * the id), where it used to answer 201 and leave a tenant whose every call failed on the
 * region keyring's tombstone. A restore writes a store only for a registered tenant. Real
 * HTTP on a SQLite control plane; the control plane on PostgreSQL (CELLCDS_TEST_PG_URL, a
 * private schema) and the SQLite -> PostgreSQL copy keep the retired ids.
 */
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { expect } from 'chai';
import { Sequelize } from 'sequelize';
import request from 'supertest';
import { copyControlPlane } from '../../tenants/control-plane-copy.ts';
import { ConflictError, openControlPlane } from '../../tenants/index.ts';
import type { ControlPlane, NewTenant } from '../../tenants/index.ts';
import { sqliteExec } from '../helpers/sqlite-exec.ts';
import { buildTestApp, PUBLIC_URL, type TestApp } from '../helpers/test-app.ts';
import { tinyPack, warfarinNsaidRequest } from '../helpers/packs.ts';

const PG_URL = process.env.CELLCDS_TEST_PG_URL;

/** Every file under a folder, recursively. */
function filesUnder(dir: string): string[] {
  if (!fs.existsSync(dir)) {
    return [];
  }
  return fs.readdirSync(dir, { withFileTypes: true }).flatMap((e) => {
    const p = path.join(dir, e.name);
    return e.isDirectory() ? filesUnder(p) : [p];
  });
}

describe('tenant ids are never reused (SQLite, through the admin API)', function () {
  this.timeout(60_000);
  let t: TestApp;
  const op = (r: request.Test) => r.set('authorization', `Bearer ${t.adminToken}`);
  const register = (id: string) =>
    op(request(t.app).post('/admin/tenants')).send({
      id,
      name: `Tenant ${id}`,
      region: 'local',
      issuers: [{ iss: `https://ehr-${id}-again.test.example`, jwksUri: 'https://x.example/j' }],
      fhirServers: [],
    });
  let backupPath = '';

  before(async () => {
    t = await buildTestApp();
    expect((await t.uploadPack(tinyPack('tiny'))).status).to.equal(201);
    const issuer = await t.addTenant('gone', {
      subscriptions: [{ pack: 'tiny', version: '1.0.0' }],
    });
    const url = `${PUBLIC_URL}/cds-services/tiny-order-sign`;
    const call = await request(t.app)
      .post('/cds-services/tiny-order-sign')
      .set('authorization', `Bearer ${await issuer.sign({ aud: url })}`)
      .send(warfarinNsaidRequest());
    expect(call.status).to.equal(200);
    const backup = await op(request(t.app).post('/admin/tenants/gone/backups'));
    expect(backup.status).to.equal(201);
    backupPath = path.relative(t.deps.backupDir, backup.body.path as string);
    const del = await op(request(t.app).delete('/admin/tenants/gone'));
    expect(del.status, JSON.stringify(del.body)).to.equal(200);
    expect(del.body).to.include({ registryRemoved: true, tenantKeyDestroyed: true });
  });
  after(async () => t.close());

  it('refuses to register a deprovisioned id again: 409 conflict naming the id and when it left', async () => {
    const res = await register('gone');
    expect(res.status, JSON.stringify(res.body)).to.equal(409);
    expect(res.body.error).to.equal('conflict');
    expect(res.body.message).to.include('tenant id gone was deprovisioned on ');
    expect(res.body.message).to.include('ids are never reused');
    expect(res.body.message).to.include('choose another id');
    // Nothing was registered.
    expect((await op(request(t.app).get('/admin/tenants/gone'))).status).to.equal(404);
    // The refusal is the same the next time (the id stays retired).
    expect((await register('gone')).status).to.equal(409);
  });

  it('still registers an id never used (201), and refuses a live duplicate as before', async () => {
    const res = await register('fresh');
    expect(res.status, JSON.stringify(res.body)).to.equal(201);
    const dup = await register('fresh');
    expect(dup.status).to.equal(409);
    expect(dup.body.message).to.equal('a tenant with this id already exists');
  });

  it("refuses to restore a deprovisioned tenant's backup (409), even unauthenticated, writing no store", async () => {
    for (const body of [
      { backup: backupPath, tenant: 'gone', allowUnauthenticated: true },
      // Without `tenant`: the id is the manifest's.
      { backup: backupPath, allowUnauthenticated: true },
    ]) {
      const res = await op(request(t.app).post('/admin/restores')).send(body);
      expect(res.status, JSON.stringify(res.body)).to.equal(409);
      expect(res.body.message).to.include('tenant gone was deprovisioned on ');
      expect(res.body.message).to.include('nothing was written');
    }
    expect(await t.deps.stores.listTenants()).to.not.include('gone');
    expect(
      filesUnder(t.dataDir).some(
        (f) => path.basename(f).includes('gone') && !f.includes(`${path.sep}backups`),
      ),
    ).to.equal(false);
    // Every refusal is audited.
    const events = await t.deps.controlPlane.audit.list({ type: 'restore.tenant' });
    expect(events.filter((e) => e.outcome === 'failure').length).to.be.at.least(2);
  });

  it('refuses an id deprovisioned before ids were retired (only its audit event says so): register and restore', async () => {
    // A control plane from before retired_tenants: the deprovisioning is in its audit trail only.
    const issuer = await t.addTenant('gone-early', {
      subscriptions: [{ pack: 'tiny', version: '1.0.0' }],
    });
    const url = `${PUBLIC_URL}/cds-services/tiny-order-sign`;
    const call = await request(t.app)
      .post('/cds-services/tiny-order-sign')
      .set('authorization', `Bearer ${await issuer.sign({ aud: url })}`)
      .send(warfarinNsaidRequest());
    expect(call.status).to.equal(200);
    const backup = await op(request(t.app).post('/admin/tenants/gone-early/backups'));
    expect(backup.status).to.equal(201);
    expect((await op(request(t.app).delete('/admin/tenants/gone-early'))).status).to.equal(200);
    await sqliteExec(path.join(t.dataDir, 'control.sqlite'), [
      "DELETE FROM retired_tenants WHERE id = 'gone-early'",
    ]);
    const [event] = await t.deps.controlPlane.audit.list({
      tenant: 'gone-early',
      type: 'tenant.deprovision',
    });
    expect(event?.outcome).to.equal('success');

    const res = await register('gone-early');
    expect(res.status, JSON.stringify(res.body)).to.equal(409);
    expect(res.body.message).to.include(`tenant id gone-early was deprovisioned on ${event?.at}`);
    const restore = await op(request(t.app).post('/admin/restores')).send({
      backup: path.relative(t.deps.backupDir, backup.body.path as string),
      allowUnauthenticated: true,
    });
    expect(restore.status, JSON.stringify(restore.body)).to.equal(409);
    expect(await t.deps.stores.listTenants()).to.not.include('gone-early');
  });

  it('does not count a deprovisioning that failed', async () => {
    // A failed deprovisioning leaves the tenant (and its id) as it was.
    await t.deps.controlPlane.audit.record({
      type: 'tenant.deprovision',
      outcome: 'failure',
      tenant: 'tried-once',
      actor: 'platform-operator:cli',
    });
    expect((await register('tried-once')).status).to.equal(201);
  });

  it('refuses to restore for a tenant never registered (404) before reading the backup', async () => {
    const res = await op(request(t.app).post('/admin/restores')).send({
      backup: backupPath,
      tenant: 'never-here',
    });
    expect(res.status, JSON.stringify(res.body)).to.equal(404);
    expect(res.body.message).to.include('tenant never-here is not registered');
    expect(await t.deps.stores.listTenants()).to.not.include('never-here');
  });
});

describe('retired tenant ids on the PostgreSQL control plane and in the copy', function () {
  this.timeout(120_000);
  if (!PG_URL) {
    it('needs CELLCDS_TEST_PG_URL (e.g. postgres://postgres@127.0.0.1:5432/test)');
    return;
  }
  const pgUrl = PG_URL;
  const tag = crypto.randomBytes(4).toString('hex');
  const schemas: string[] = [];
  const schemaNamed = (name: string) => {
    const s = `cellcds_retired_${tag}_${name}`;
    schemas.push(s);
    return s;
  };
  const newTenant = (id: string): NewTenant => ({
    id,
    name: `Tenant ${id}`,
    region: 'local',
    issuers: [{ iss: `https://ehr-${id}-${tag}.example`, jwksUri: 'https://x.example/j' }],
    fhirServers: [],
  });
  const refusal = async (p: Promise<unknown>): Promise<Error> => {
    try {
      await p;
    } catch (err) {
      return err as Error;
    }
    throw new Error('expected a refusal');
  };
  let dir: string;
  const opened: ControlPlane[] = [];

  before(() => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cellcds-retired-'));
  });
  after(async () => {
    for (const cp of opened) {
      await cp.close().catch(() => undefined);
    }
    const db = new Sequelize(pgUrl, { dialect: 'postgres', logging: false });
    for (const s of schemas) {
      await db.query(`DROP SCHEMA IF EXISTS "${s}" CASCADE`);
    }
    await db.close();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it('retires the id on removal; every replica refuses it (ConflictError), other ids register', async () => {
    const schema = schemaNamed('pg');
    const a = await openControlPlane({ postgresUrl: pgUrl, schema });
    opened.push(a);
    const b = await openControlPlane({ postgresUrl: pgUrl, schema });
    opened.push(b);
    await a.tenants.create(newTenant('gone'));
    await a.tenants.remove('gone');
    const err = await refusal(b.tenants.create(newTenant('gone')));
    expect(err).to.be.instanceOf(ConflictError);
    expect(err.message).to.include('tenant id gone was deprovisioned on ');
    expect(await b.tenants.retiredAt?.('gone')).to.be.a('string');
    expect(await b.tenants.retiredAt?.('other')).to.equal(undefined);
    expect((await b.tenants.create(newTenant('other'))).id).to.equal('other');
  });

  it('refuses an id whose deprovisioning only the audit trail records (a control plane from before retired ids)', async () => {
    const schema = schemaNamed('early');
    const cp = await openControlPlane({ postgresUrl: pgUrl, schema });
    opened.push(cp);
    await cp.tenants.create(newTenant('gone-early'));
    await cp.tenants.remove('gone-early');
    await cp.audit.record({
      type: 'tenant.deprovision',
      outcome: 'success',
      tenant: 'gone-early',
      actor: 'platform-operator:cli',
    });
    const db = new Sequelize(pgUrl, { dialect: 'postgres', logging: false });
    try {
      await db.query(`DELETE FROM "${schema}".retired_tenants`);
    } finally {
      await db.close();
    }
    const err = await refusal(cp.tenants.create(newTenant('gone-early')));
    expect(err).to.be.instanceOf(ConflictError);
    expect(err.message).to.include('tenant id gone-early was deprovisioned on ');
  });

  it('the SQLite -> PostgreSQL copy carries the retired ids', async () => {
    const file = path.join(dir, 'control.sqlite');
    const src = await openControlPlane({ storage: file });
    try {
      await src.tenants.create(newTenant('gone'));
      await src.tenants.remove('gone');
    } finally {
      await src.close();
    }
    const schema = schemaNamed('copy');
    const copied = await copyControlPlane({ from: file, postgresUrl: pgUrl, schema });
    expect((copied.counts as Record<string, number>)['retired_tenants']).to.equal(1);
    const cp = await openControlPlane({ postgresUrl: pgUrl, schema });
    opened.push(cp);
    expect(await cp.tenants.retiredAt?.('gone')).to.be.a('string');
    expect(await refusal(cp.tenants.create(newTenant('gone')))).to.be.instanceOf(ConflictError);
  });
});
