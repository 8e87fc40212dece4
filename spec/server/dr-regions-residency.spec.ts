import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { expect } from 'chai';
import request from 'supertest';
import YAML from 'yaml';
import { buildEvidence } from '../../server/evidence.ts';
import { buildTestApp, type TestApp } from '../helpers/test-app.ts';
import { patientViewRequest, tinyPack } from '../helpers/packs.ts';
import { TestIssuer } from '../helpers/test-issuer.ts';
import type { RegionInfo } from '../../tenants/index.ts';

const URLS = {
  'us-east': 'https://us-east.cds.test',
  'eu-west': 'https://eu-west.cds.test',
} as const;
type RegionId = keyof typeof URLS;

/**
 * A DR region is processing: during a failover the standby stores the tenant's records. So a
 * DR region outside every jurisdiction the tenant's processing regions lie in contradicts the
 * policy: refused at registration and on PATCH (422 naming `residency.dr.regions[i]` and the
 * region), and a failover into it is refused. A tenant already registered that way (before
 * the check) is never served there.
 */
describe('DR regions must stay within the jurisdictions of the processing regions', function () {
  this.timeout(90_000);
  let root: string;
  const planes = {} as Record<RegionId, TestApp>;
  let issuer: TestIssuer;
  const MARKER = 'Walter Plantedus MRN-US-9902';
  const MATRIX: RegionInfo[] = [
    { id: 'us-east', jurisdiction: 'US', failover: ['eu-west'] },
    { id: 'eu-west', jurisdiction: 'EU', failover: ['us-east'] },
  ];

  const region = (id: RegionId) => ({
    id,
    jurisdiction: id.startsWith('eu') ? 'EU' : 'US',
    publicUrl: URLS[id],
    storage: { dataDir: `data/${id}` },
    backupDir: `backups/${id}`,
    keyProvider: { kind: 'local-keyring', dir: `keys/${id}` },
    failover: id === 'us-east' ? ['eu-west'] : ['us-east'],
  });

  before(async () => {
    root = fs.mkdtempSync(path.join(os.tmpdir(), 'cellcds-dr-'));
    const file = path.join(root, 'regions.yaml');
    fs.writeFileSync(file, YAML.stringify({ regions: [region('us-east'), region('eu-west')] }));
    for (const id of Object.keys(URLS) as RegionId[]) {
      planes[id] = await buildTestApp({
        CELLCDS_DATA_DIR: root,
        CELLCDS_REGIONS_FILE: file,
        CELLCDS_REGION: id,
      });
    }
    expect((await planes['us-east'].uploadPack(tinyPack('tiny'))).status).to.equal(201);
    issuer = await TestIssuer.create({ iss: 'https://ehr-ushosp.test.example' });
  });
  after(async () => {
    for (const p of Object.values(planes)) {
      await p.close();
    }
    fs.rmSync(root, { recursive: true, force: true });
  });

  const us = () => planes['us-east'];
  const asOp = (r: request.Test) => r.set('authorization', `Bearer ${us().adminToken}`);
  const registration = (id: string, residency: unknown) => ({
    id,
    name: `Tenant ${id}`,
    region: 'us-east',
    issuers: [{ iss: `https://ehr-${id}.test.example`, jwks: issuer.publicJwks() }],
    fhirServers: [],
    residency,
  });
  const US_ONLY_EU_DR = {
    processingRegions: ['us-east'],
    backupRegions: ['us-east'],
    dr: { mode: 'regions', regions: ['eu-west'] },
  };

  const expectDrRefusal = (res: request.Response) => {
    expect(res.status, JSON.stringify(res.body)).to.equal(422);
    expect(res.body.error).to.equal('unprocessable');
    const problem = (
      res.body.problems as Array<{ path: string; reason: string; message: string }>
    ).find((p) => p.path === 'residency.dr.regions[0]');
    expect(problem, JSON.stringify(res.body)).to.not.equal(undefined);
    expect(problem?.reason).to.equal('dr_other_jurisdiction');
    expect(problem?.message).to.include('eu-west');
  };

  it('refuses to register a US tenant whose DR region is in the EU (422 naming the field and region), audited', async () => {
    const res = await asOp(request(us().app).post('/admin/tenants')).send(
      registration('ushosp', US_ONLY_EU_DR),
    );
    expectDrRefusal(res);
    const refused = await us().deps.controlPlane.audit.list({
      tenant: 'ushosp',
      type: 'residency.refused',
    });
    expect(refused).to.have.length(1);
    expect(refused[0]?.detail?.reasons).to.equal('dr_other_jurisdiction');
    expect((await asOp(request(us().app).get('/admin/tenants/ushosp'))).status).to.equal(404);
  });

  it('refuses a PATCH that adds such a DR region, keeping the policy', async () => {
    const created = await asOp(request(us().app).post('/admin/tenants')).send(
      registration('ushosp-2', { dr: { mode: 'jurisdiction' } }),
    );
    expect(created.status, JSON.stringify(created.body)).to.equal(201);
    const res = await asOp(request(us().app).patch('/admin/tenants/ushosp-2')).send({
      residency: US_ONLY_EU_DR,
    });
    expectDrRefusal(res);
    const after = await asOp(request(us().app).get('/admin/tenants/ushosp-2'));
    expect(after.body.residency).to.deep.equal({ dr: { mode: 'jurisdiction' } });
  });

  it('accepts the EU DR region once the policy allows processing in the EU', async () => {
    const res = await asOp(request(us().app).post('/admin/tenants')).send(
      registration('ushosp-3', { ...US_ONLY_EU_DR, processingRegions: ['us-east', 'eu-west'] }),
    );
    expect(res.status, JSON.stringify(res.body)).to.equal(201);
  });

  it('refuses a failover into such a DR region of a tenant registered before the check, and never serves it there', async () => {
    const cp = us().deps.controlPlane;
    const signer = await TestIssuer.create({ iss: 'https://ehr-ushosp-old.test.example' });
    // Registered before the check: without the matrix, only the matrix-free rules run.
    await cp.tenants.create({
      ...registration('ushosp-old', US_ONLY_EU_DR),
      issuers: [{ iss: signer.iss, jwks: signer.publicJwks() }],
      residency: {
        processingRegions: ['us-east'],
        backupRegions: ['us-east'],
        dr: { mode: 'regions', regions: ['eu-west'] },
      },
    });
    const sub = await asOp(request(us().app).put('/admin/tenants/ushosp-old/subscriptions')).send([
      { pack: 'tiny', version: '1.0.0' },
    ]);
    expect(sub.status, JSON.stringify(sub.body)).to.equal(200);
    const failover = await asOp(request(us().app).post('/admin/tenants/ushosp-old/failover')).send({
      region: 'eu-west',
    });
    expect(failover.status, JSON.stringify(failover.body)).to.equal(422);
    expect((failover.body.problems as Array<{ reason: string }>).map((p) => p.reason)).to.include(
      'dr_other_jurisdiction',
    );
    // A failover declared before the check (as the old rule allowed it): the EU plane does not
    // serve the tenant (421), and stores nothing.
    const oldRule = MATRIX.map((r) => ({ ...r, jurisdiction: 'ANY' }));
    await cp.tenants.declareFailover('ushosp-old', 'eu-west', { regions: oldRule });
    const res = await request(planes['eu-west'].app)
      .post('/cds-services/tiny-patient-view')
      .set(
        'authorization',
        `Bearer ${await signer.sign({ aud: `${URLS['eu-west']}/cds-services/tiny-patient-view` })}`,
      )
      .send(patientViewRequest(MARKER));
    expect(res.status, JSON.stringify(res.body)).to.equal(421);
    expect(await planes['eu-west'].deps.stores.listTenants()).to.not.include('ushosp-old');
    // The evidence report names both problems in the tenant's placement.
    const report = await buildEvidence({
      controlPlane: cp,
      matrix: us().deps.matrix,
      from: new Date(Date.now() - 60_000),
      to: new Date(Date.now() + 1000),
    });
    const placement = report.tenants.find((p) => p.id === 'ushosp-old');
    expect(placement?.problems.map((p) => `${p.path}: ${p.reason}`)).to.deep.equal([
      'residency.dr.regions[0]: dr_other_jurisdiction',
      'residency.dr.regions: dr_other_jurisdiction',
    ]);
    expect(report.tenants.find((p) => p.id === 'ushosp-3')?.problems).to.deep.equal([]);
  });
});
