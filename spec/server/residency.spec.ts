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

  it('reports readiness per plane', async () => {
    const res = await request(planes['eu-west'].app).get('/readyz');
    expect(res.status).to.equal(200);
    expect(res.body).to.deep.equal({
      ready: true,
      region: 'eu-west',
      controlPlane: 'ok',
      keyProvider: 'ok',
    });
  });
});
