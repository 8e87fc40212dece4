import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { expect } from 'chai';
import request from 'supertest';
import YAML from 'yaml';
import { buildTestApp, type TestApp } from '../helpers/test-app.ts';
import { patientViewRequest, tinyPack } from '../helpers/packs.ts';
import type { TestIssuer } from '../helpers/test-issuer.ts';

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

const URLS = {
  'us-east': 'https://us-east.cds.test',
  'eu-west': 'https://eu-west.cds.test',
  'eu-central': 'https://eu-central.cds.test',
} as const;
type RegionId = keyof typeof URLS;

/**
 * Three regions, one plane (app) per region, one shared control plane. Residency is enforced
 * by the planes: a tenant's call to a plane that may not serve it gets 421 and leaves nothing.
 */
describe('regions and data residency (two jurisdictions, one plane per region)', function () {
  this.timeout(90_000);
  let root: string;
  const planes = {} as Record<RegionId, TestApp>;
  let euIssuer: TestIssuer;
  let usIssuer: TestIssuer;
  const EU_MARKER = 'Ingrid Plantedeu MRN-EU-4471';
  const US_MARKER = 'Walter Plantedus MRN-US-9902';

  const region = (id: RegionId, failover: RegionId[]) => ({
    id,
    jurisdiction: id.startsWith('eu') ? 'EU' : 'US',
    publicUrl: URLS[id],
    storage: { dataDir: `data/${id}` },
    backupDir: `backups/${id}`,
    keyProvider: { kind: 'local-keyring', dir: `keys/${id}` },
    failover,
  });

  before(async () => {
    root = fs.mkdtempSync(path.join(os.tmpdir(), 'cellcds-regions-'));
    const file = path.join(root, 'regions.yaml');
    fs.writeFileSync(
      file,
      YAML.stringify({
        regions: [
          region('us-east', ['eu-west']),
          region('eu-west', ['eu-central', 'us-east']),
          region('eu-central', []),
        ],
      }),
    );
    for (const id of Object.keys(URLS) as RegionId[]) {
      planes[id] = await buildTestApp({
        CELLCDS_DATA_DIR: root,
        CELLCDS_REGIONS_FILE: file,
        CELLCDS_REGION: id,
      });
    }
    expect((await planes['us-east'].uploadPack(tinyPack('tiny'))).status).to.equal(201);
    euIssuer = await planes['eu-west'].addTenant('eu-hospital', {
      subscriptions: [{ pack: 'tiny', version: '1.0.0' }],
    });
    usIssuer = await planes['us-east'].addTenant('us-hospital', {
      subscriptions: [{ pack: 'tiny', version: '1.0.0' }],
    });
    // The EU hospital's policy: processing only in the EU, failover only within the jurisdiction.
    const patch = await request(planes['eu-west'].app)
      .patch('/admin/tenants/eu-hospital')
      .set('authorization', `Bearer ${planes['eu-west'].adminToken}`)
      .send({
        residency: {
          processingRegions: ['eu-west'],
          backupRegions: ['eu-west'],
          dr: { mode: 'jurisdiction' },
        },
      });
    expect(patch.status, JSON.stringify(patch.body)).to.equal(200);
  });
  after(async () => {
    for (const p of Object.values(planes)) {
      await p.close();
    }
    fs.rmSync(root, { recursive: true, force: true });
  });

  const call = async (plane: RegionId, issuer: TestIssuer, marker: string) =>
    request(planes[plane].app)
      .post('/cds-services/tiny-patient-view')
      .set(
        'authorization',
        `Bearer ${await issuer.sign({ aud: `${URLS[plane]}/cds-services/tiny-patient-view` })}`,
      )
      .send(patientViewRequest(marker));

  it('serves each tenant in its home region', async () => {
    expect((await call('eu-west', euIssuer, EU_MARKER)).status).to.equal(200);
    expect((await call('us-east', usIssuer, US_MARKER)).status).to.equal(200);
  });

  for (const [plane, who, marker, tenant] of [
    ['us-east', 'EU-pinned', EU_MARKER, 'eu-hospital'],
    ['eu-west', 'US', US_MARKER, 'us-hospital'],
  ] as const) {
    it(`answers 421 to the ${who} tenant's call on the ${plane} plane, leaving no file, row, log line or metric label`, async () => {
      const issuer = tenant === 'eu-hospital' ? euIssuer : usIssuer;
      const logBefore = planes[plane].logLines.length;
      const res = await call(plane, issuer, `${marker} misdirected`);
      expect(res.status).to.equal(421);
      expect(res.body.error).to.equal('misdirected');
      // No store, file or key of that tenant in this plane's region.
      const regionFiles = [
        ...filesUnder(path.join(root, 'data', plane)),
        ...filesUnder(path.join(root, 'keys', plane)),
        ...filesUnder(path.join(root, 'backups', plane)),
      ];
      expect(regionFiles.filter((f) => f.includes(tenant))).to.deep.equal([]);
      for (const f of regionFiles) {
        expect(fs.readFileSync(f).includes(Buffer.from(marker)), f).to.equal(false);
      }
      expect(await planes[plane].deps.stores.listTenants()).to.not.include(tenant);
      // The plane's log lines about it carry no payload and no tenant id.
      const lines = planes[plane].logLines.slice(logBefore).join('\n');
      expect(lines).to.include('misdirected');
      expect(lines).to.not.include(marker);
      expect(lines).to.not.include(tenant);
      // Metrics: no tenant label anywhere; the outcome is counted.
      const metrics = await request(planes[plane].app).get('/metrics');
      expect(metrics.text).to.not.include(tenant);
      expect(metrics.text).to.match(/outcome="misdirected"/);
    });
  }

  it('refuses to create or move a tenant into a region its policy forbids (422), and audits it', async () => {
    const op = planes['eu-west'];
    const res = await request(op.app)
      .patch('/admin/tenants/eu-hospital')
      .set('authorization', `Bearer ${op.adminToken}`)
      .send({
        residency: {
          processingRegions: ['us-east'],
          backupRegions: ['eu-west'],
          dr: { mode: 'none' },
        },
      });
    expect(res.status).to.equal(422);
    expect(res.body.error).to.equal('unprocessable');
    const events = await op.deps.controlPlane.audit.list({
      tenant: 'eu-hospital',
      type: 'residency.refused',
    });
    expect(events.length).to.be.greaterThan(0);
  });

  it('lets a declared failover within the jurisdiction serve the tenant; refuses one to another jurisdiction', async () => {
    const op = planes['eu-west'];
    const asOp = (r: request.Test) => r.set('authorization', `Bearer ${op.adminToken}`);
    // eu-central is not yet allowed to serve.
    expect((await call('eu-central', euIssuer, EU_MARKER)).status).to.equal(421);
    const toUs = await asOp(request(op.app).post('/admin/tenants/eu-hospital/failover')).send({
      region: 'us-east',
    });
    expect(toUs.status).to.equal(422);
    const toCentral = await asOp(request(op.app).post('/admin/tenants/eu-hospital/failover')).send({
      region: 'eu-central',
    });
    expect(toCentral.status, JSON.stringify(toCentral.body)).to.equal(200);
    expect((await call('eu-central', euIssuer, EU_MARKER)).status).to.equal(200);
    // The US plane still may not.
    expect((await call('us-east', euIssuer, EU_MARKER)).status).to.equal(421);
    const cleared = await asOp(request(op.app).delete('/admin/tenants/eu-hospital/failover'));
    expect(cleared.status).to.equal(200);
    expect((await call('eu-central', euIssuer, EU_MARKER)).status).to.equal(421);
    const types = (await op.deps.controlPlane.audit.list({ tenant: 'eu-hospital' })).map(
      (e) => e.type,
    );
    expect(types).to.include.members([
      'residency.failover.declared',
      'residency.failover.cleared',
      'residency.misdirected',
    ]);
  });

  // Admin data routes open a tenant's store: only where the tenant's data may be.
  it('answers 421 to admin data routes on a plane that may not serve the tenant and holds none of its data, creating nothing', async () => {
    const us = planes['us-east'];
    const asOp = (r: request.Test) => r.set('authorization', `Bearer ${us.adminToken}`);
    const before = (await us.deps.controlPlane.audit.list({ tenant: 'eu-hospital' })).length;
    // The tenant's own auditor (records:read is not the operator's) on the wrong plane.
    const issued = await asOp(request(us.app).post('/admin/tokens')).send({
      role: 'auditor',
      tenant: 'eu-hospital',
    });
    expect(issued.status, JSON.stringify(issued.body)).to.equal(201);
    const records = await request(us.app)
      .get('/admin/tenants/eu-hospital/invocations')
      .set('authorization', `Bearer ${issued.body.token as string}`);
    expect(records.status, JSON.stringify(records.body)).to.equal(421);
    for (const r of [
      request(us.app).get('/admin/tenants/eu-hospital/keys'),
      request(us.app).post('/admin/tenants/eu-hospital/keys/rotate'),
      request(us.app).post('/admin/tenants/eu-hospital/backups'),
      request(us.app).get('/admin/tenants/eu-hospital/audit/verify'),
      request(us.app)
        .post('/admin/restores')
        .send({ backup: 'eu-hospital-old', tenant: 'eu-hospital' }),
    ]) {
      const res = await asOp(r);
      expect(res.status, JSON.stringify(res.body)).to.equal(421);
    }
    const files = [
      ...filesUnder(path.join(root, 'data', 'us-east')),
      ...filesUnder(path.join(root, 'keys', 'us-east')),
      ...filesUnder(path.join(root, 'backups', 'us-east')),
    ];
    expect(files.filter((f) => f.includes('eu-hospital'))).to.deep.equal([]);
    expect(await us.deps.stores.listTenants()).to.not.include('eu-hospital');
    const events = (await us.deps.controlPlane.audit.list({ tenant: 'eu-hospital' })).slice(before);
    expect(events.filter((e) => e.type === 'residency.misdirected').length).to.be.greaterThan(0);
  });

  it("refuses a backup in a region the tenant's policy does not allow for backups (422, audited), and writes nothing", async () => {
    const op = planes['eu-west'];
    const asOp = (r: request.Test) => r.set('authorization', `Bearer ${op.adminToken}`);
    const policy = (backupRegions: string[]) => ({
      residency: { processingRegions: ['eu-west'], backupRegions, dr: { mode: 'jurisdiction' } },
    });
    const patched = await asOp(request(op.app).patch('/admin/tenants/eu-hospital')).send(
      policy(['eu-central']),
    );
    expect(patched.status, JSON.stringify(patched.body)).to.equal(200);
    try {
      const res = await asOp(request(op.app).post('/admin/tenants/eu-hospital/backups'));
      expect(res.status, JSON.stringify(res.body)).to.equal(422);
      expect(JSON.stringify(res.body)).to.include('residency.backupRegions');
      const backups = filesUnder(path.join(root, 'backups', 'eu-west'));
      expect(backups.filter((f) => f.includes('eu-hospital'))).to.deep.equal([]);
      const refused = await op.deps.controlPlane.audit.list({
        tenant: 'eu-hospital',
        type: 'residency.refused',
      });
      expect(refused.some((e) => e.detail?.['action'] === 'backup')).to.equal(true);
    } finally {
      const back = await asOp(request(op.app).patch('/admin/tenants/eu-hospital')).send(
        policy(['eu-west']),
      );
      expect(back.status).to.equal(200);
    }
    expect(
      (await asOp(request(op.app).post('/admin/tenants/eu-hospital/backups'))).status,
    ).to.equal(201);
  });

  it('deletes a tenant only from its home plane, and only once every failover standby holding its data is shredded', async () => {
    const home = planes['eu-west'];
    const central = planes['eu-central'];
    const us = planes['us-east'];
    const del = (plane: TestApp) =>
      request(plane.app)
        .delete('/admin/tenants/eu-hospital')
        .set('authorization', `Bearer ${plane.adminToken}`);
    const registered = async () =>
      (await home.deps.controlPlane.tenants.list()).some((t) => t.id === 'eu-hospital');
    // The failover spec above left records in eu-central (a standby that served calls).
    expect(await central.deps.stores.listTenants()).to.include('eu-hospital');

    // A plane of a region holding none of its data: refused, nothing removed.
    const wrong = await del(us);
    expect(wrong.status, JSON.stringify(wrong.body)).to.equal(409);
    expect(JSON.stringify(wrong.body)).to.include('eu-west');
    expect(await registered()).to.equal(true);

    // While a failover is declared: refused everywhere.
    const asHome = (r: request.Test) => r.set('authorization', `Bearer ${home.adminToken}`);
    const declared = await asHome(
      request(home.app).post('/admin/tenants/eu-hospital/failover'),
    ).send({ region: 'eu-central' });
    expect(declared.status).to.equal(200);
    expect((await del(home)).status).to.equal(409);
    expect((await del(central)).status).to.equal(409);
    expect(
      (await asHome(request(home.app).delete('/admin/tenants/eu-hospital/failover'))).status,
    ).to.equal(200);

    // The home plane first: refused, naming the standby that may still hold data.
    const early = await del(home);
    expect(early.status, JSON.stringify(early.body)).to.equal(409);
    expect(JSON.stringify(early.body)).to.include('eu-central');
    expect(await registered()).to.equal(true);
    expect(await home.deps.stores.listTenants()).to.include('eu-hospital');

    // The standby's plane shreds its region's data and keeps the registry entry.
    const standby = await del(central);
    expect(standby.status, JSON.stringify(standby.body)).to.equal(200);
    expect(standby.body).to.include({ registryRemoved: false, storeDeleted: true });
    expect(await central.deps.stores.listTenants()).to.not.include('eu-hospital');
    expect(
      filesUnder(path.join(root, 'data', 'eu-central')).filter((f) => f.includes('eu-hospital')),
    ).to.deep.equal([]);
    expect(await registered()).to.equal(true);

    // Then the home plane: shredded there too, and gone from the registry.
    const done = await del(home);
    expect(done.status, JSON.stringify(done.body)).to.equal(200);
    expect(done.body).to.include({ registryRemoved: true, storeDeleted: true });
    expect(await registered()).to.equal(false);
    expect(await home.deps.stores.listTenants()).to.not.include('eu-hospital');
    const types = (await home.deps.controlPlane.audit.list({ tenant: 'eu-hospital' })).map(
      (e) => e.type,
    );
    expect(types).to.include.members(['tenant.shred.region', 'tenant.deprovision']);
  });

  it('reports readiness per plane', async () => {
    const res = await request(planes['eu-west'].app).get('/readyz');
    expect(res.status).to.equal(200);
    expect(res.body).to.deep.equal({
      ready: true,
      region: 'eu-west',
      controlPlane: 'ok',
      keyProvider: 'ok',
      dataPlane: 'ok',
    });
  });
});
