import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { expect } from 'chai';
import request from 'supertest';
import { tinyPack, warfarinNsaidRequest } from '../helpers/packs.ts';
import { runCli } from '../helpers/processes.ts';
import { buildTestApp, PUBLIC_URL, type TestApp } from '../helpers/test-app.ts';
import { TestIssuer } from '../helpers/test-issuer.ts';

const SERVICE = `${PUBLIC_URL}/cds-services/tiny-order-sign`;

/**
 * Registering a second tenant on an issuer already registered to another makes that issuer
 * shared, and from then on every token of it must carry `tenant`: the first tenant's EHR, which
 * sent none, would be refused (401 bad_tenant). So it is refused (409) unless the operator
 * confirms with `sharedIssuer: true`, checked in the write transaction.
 */
describe('registering a tenant on an issuer another tenant already uses', function () {
  this.timeout(120_000);
  let t: TestApp;
  let run = 0;
  const op = (r: request.Test) => r.set('authorization', `Bearer ${t.adminToken}`);

  before(async () => {
    t = await buildTestApp();
    expect((await t.uploadPack(tinyPack('tiny'))).status).to.equal(201);
  });
  after(async () => t.close());

  async function freshIssuer(): Promise<TestIssuer> {
    run += 1;
    return TestIssuer.create({ iss: `https://ehr-shared-${String(run)}.test.example` });
  }

  const body = (id: string, issuers: TestIssuer[], extra: Record<string, unknown> = {}) => ({
    id,
    name: `Tenant ${id}`,
    region: t.deps.config.region,
    issuers: issuers.map((i) => ({ iss: i.iss, jwks: i.publicJwks() })),
    ...extra,
  });
  const create = (id: string, issuers: TestIssuer[], extra: Record<string, unknown> = {}) =>
    op(request(t.app).post('/admin/tenants')).send(body(id, issuers, extra));
  const patch = (id: string, issuers: TestIssuer[], extra: Record<string, unknown> = {}) =>
    op(request(t.app).patch(`/admin/tenants/${id}`)).send({
      issuers: issuers.map((i) => ({ iss: i.iss, jwks: i.publicJwks() })),
      ...extra,
    });
  const callService = async (token: string) =>
    request(t.app)
      .post('/cds-services/tiny-order-sign')
      .set('authorization', `Bearer ${token}`)
      .send(warfarinNsaidRequest());
  const subscribe = async (id: string) => {
    const res = await op(request(t.app).put(`/admin/tenants/${id}/subscriptions`)).send([
      { pack: 'tiny', version: '1.0.0' },
    ]);
    expect(res.status, JSON.stringify(res.body)).to.equal(200);
  };

  function expectSharedIssuerConflict(
    res: request.Response,
    iss: string,
    onIt: readonly string[],
  ): void {
    expect(res.status, JSON.stringify(res.body)).to.equal(409);
    expect(res.body.error).to.equal('conflict');
    const message = res.body.message as string;
    expect(message).to.include(iss);
    for (const id of onIt) {
      expect(message).to.include(id);
    }
    expect(message).to.include('"tenant"');
    expect(message).to.include('"sharedIssuer": true');
    expect(message).to.include('--shared-issuer');
  }

  it('refuses (409) a second tenant on an issuer of a live tenant, and the first tenant keeps working', async () => {
    const ehr = await freshIssuer();
    expect((await create('first-a', [ehr])).status).to.equal(201);
    await subscribe('first-a');
    // The first tenant's EHR sends no `tenant` claim (it serves one tenant).
    expect((await callService(await ehr.sign({ aud: SERVICE }))).status).to.equal(200);

    const res = await create('second-a', [ehr]);
    expectSharedIssuerConflict(res, ehr.iss, ['first-a']);
    expect((await op(request(t.app).get('/admin/tenants/second-a'))).status).to.equal(404);
    expect(
      (await t.deps.controlPlane.tenants.findByIssuer(ehr.iss)).map((x) => x.id),
    ).to.deep.equal(['first-a']);
    // Not taken down: a token without `tenant` is still served.
    expect((await callService(await ehr.sign({ aud: SERVICE }))).status).to.equal(200);
  });

  it('refuses it when the tenant already on the issuer is suspended (it may be resumed)', async () => {
    const ehr = await freshIssuer();
    expect((await create('susp-a', [ehr])).status).to.equal(201);
    expect((await op(request(t.app).post('/admin/tenants/susp-a/suspend'))).status).to.equal(200);
    expectSharedIssuerConflict(await create('susp-b', [ehr]), ehr.iss, ['susp-a']);
  });

  it('names every issuer that would become shared and the tenant on each', async () => {
    const one = await freshIssuer();
    const two = await freshIssuer();
    const own = await freshIssuer();
    expect((await create('multi-a', [one])).status).to.equal(201);
    expect((await create('multi-b', [two])).status).to.equal(201);
    const res = await create('multi-c', [own, one, two]);
    expectSharedIssuerConflict(res, one.iss, ['multi-a']);
    expect(res.body.message).to.include(two.iss);
    expect(res.body.message).to.include('multi-b');
    expect(res.body.message).to.not.include(own.iss);
  });

  it('accepts it with "sharedIssuer": true, audited with the flag; tokens then need `tenant`', async () => {
    const ehr = await freshIssuer();
    expect((await create('flag-a', [ehr])).status).to.equal(201);
    const res = await create('flag-b', [ehr], { sharedIssuer: true });
    expect(res.status, JSON.stringify(res.body)).to.equal(201);
    expect(res.body).to.not.have.property('sharedIssuer');
    expect(
      (await t.deps.controlPlane.tenants.findByIssuer(ehr.iss)).map((x) => x.id),
    ).to.deep.equal(['flag-a', 'flag-b']);
    const events = await t.deps.controlPlane.audit.list({ tenant: 'flag-b' });
    const created = events.find((e) => e.type === 'admin.tenant.create');
    expect(created?.outcome).to.equal('success');
    expect(created?.detail?.sharedIssuer).to.equal(true);
    // What the operator confirmed: tokens of the issuer now need `tenant`.
    await subscribe('flag-a');
    expect((await callService(await ehr.sign({ aud: SERVICE }))).status).to.equal(401);
    expect((await callService(await ehr.sign({ aud: SERVICE, tenant: 'flag-a' }))).status).to.equal(
      200,
    );
  });

  it('does not audit the flag on a plain registration', async () => {
    const ehr = await freshIssuer();
    expect((await create('plain-a', [ehr])).status).to.equal(201);
    const events = await t.deps.controlPlane.audit.list({ tenant: 'plain-a' });
    const created = events.find((e) => e.type === 'admin.tenant.create');
    expect(created?.detail?.sharedIssuer).to.equal(undefined);
  });

  it('needs no flag for a third tenant on an issuer already shared', async () => {
    const ehr = await freshIssuer();
    expect((await create('third-a', [ehr])).status).to.equal(201);
    expect((await create('third-b', [ehr], { sharedIssuer: true })).status).to.equal(201);
    const res = await create('third-c', [ehr]);
    expect(res.status, JSON.stringify(res.body)).to.equal(201);
  });

  it('refuses a sharedIssuer that is not a boolean (400 naming it)', async () => {
    const ehr = await freshIssuer();
    const res = await create('bad-flag', [ehr], { sharedIssuer: 'yes' });
    expect(res.status).to.equal(400);
    expect(res.body.error).to.equal('invalid_request');
    expect(res.body.field).to.equal('sharedIssuer');
  });

  it('refuses (409) a PATCH that adds an issuer of another tenant, and accepts it with the flag', async () => {
    const ehr = await freshIssuer();
    const other = await freshIssuer();
    expect((await create('patch-a', [ehr])).status).to.equal(201);
    expect((await create('patch-b', [other])).status).to.equal(201);
    expectSharedIssuerConflict(await patch('patch-b', [other, ehr]), ehr.iss, ['patch-a']);
    expect(
      (await op(request(t.app).get('/admin/tenants/patch-b'))).body.issuers.map(
        (i: { iss: string }) => i.iss,
      ),
    ).to.deep.equal([other.iss]);
    const ok = await patch('patch-b', [other, ehr], { sharedIssuer: true });
    expect(ok.status, JSON.stringify(ok.body)).to.equal(200);
    const events = await t.deps.controlPlane.audit.list({ tenant: 'patch-b' });
    const updated = events.filter((e) => e.type === 'admin.tenant.update').at(-1);
    expect(updated?.detail?.sharedIssuer).to.equal(true);
    expect(updated?.detail?.fields).to.equal('issuers');
  });

  it('lets a tenant re-send its own issuers (keys rotated) without the flag, shared or not', async () => {
    const ehr = await freshIssuer();
    expect((await create('own-a', [ehr])).status).to.equal(201);
    expect((await patch('own-a', [ehr])).status).to.equal(200);
    expect((await create('own-b', [ehr], { sharedIssuer: true })).status).to.equal(201);
    expect((await patch('own-a', [ehr])).status).to.equal(200);
    expect((await patch('own-b', [ehr])).status).to.equal(200);
  });

  it('lets only one of two concurrent registrations on one issuer through without the flag', async () => {
    const ehr = await freshIssuer();
    const results = await Promise.all([create('race-a', [ehr]), create('race-b', [ehr])]);
    const statuses = results.map((r) => r.status).sort();
    expect(statuses).to.deep.equal([201, 409]);
    expect(await t.deps.controlPlane.tenants.findByIssuer(ehr.iss)).to.have.length(1);
  });

  describe('cellcds tenant add', () => {
    let work: string;
    let env: NodeJS.ProcessEnv;
    let jwksFile: string;
    const ISS = 'https://ehr.cli-shared.test.example';

    before(async () => {
      work = fs.mkdtempSync(path.join(os.tmpdir(), 'cellcds-shared-iss-'));
      env = {
        ...process.env,
        CELLCDS_DATA_DIR: path.join(work, 'data'),
        CELLCDS_LOG_LEVEL: 'silent',
      };
      const ehr = await TestIssuer.create({ iss: ISS });
      jwksFile = path.join(work, 'jwks.json');
      fs.writeFileSync(jwksFile, JSON.stringify(ehr.publicJwks()));
    });
    after(() => {
      fs.rmSync(work, { recursive: true, force: true });
    });

    const add = (id: string, extra: string[] = []) =>
      runCli(
        [
          'tenant',
          'add',
          '--id',
          id,
          '--name',
          id,
          '--iss',
          ISS,
          '--jwks-file',
          jwksFile,
          ...extra,
        ],
        env,
      );

    it('refuses a second tenant on the issuer (exit 1, naming the issuer and tenant), accepts it with --shared-issuer', () => {
      const first = add('cli-a');
      expect(first.status, first.stderr).to.equal(0);
      const second = add('cli-b');
      expect(second.status, second.stderr).to.equal(1);
      expect(second.stderr).to.include(ISS);
      expect(second.stderr).to.include('cli-a');
      expect(second.stderr).to.include('--shared-issuer');
      const list = runCli(['tenant', 'list'], env);
      expect(list.stdout).to.not.include('cli-b');
      const flagged = add('cli-b', ['--shared-issuer']);
      expect(flagged.status, flagged.stderr).to.equal(0);
      expect(JSON.parse(flagged.stdout).id).to.equal('cli-b');
      const audit = runCli(['audit', 'list', '--tenant', 'cli-b'], env);
      expect(audit.stdout).to.include('admin.tenant.create');
      expect(audit.stdout).to.include('sharedIssuer');
    });
  });
});
