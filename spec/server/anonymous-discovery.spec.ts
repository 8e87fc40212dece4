/**
 * Discovery without a JWT, for one deployment-chosen tenant (CDS-HOOKS.md §11: a JWT on
 * discovery is "optional or configurable"; an EHR's set-up screen or a conformance harness,
 * e.g. Inferno's CRD discovery test, fetches it anonymously). Off by default. Only discovery:
 * service calls and feedback always need the JWT, and a request that sends one is verified as
 * always (a bad one is refused, never served anonymously).
 */
import { expect } from 'chai';
import request from 'supertest';
import { tinyPack, warfarinNsaidRequest } from '../helpers/packs.ts';
import { buildTestApp, PUBLIC_URL, type TestApp } from '../helpers/test-app.ts';
import type { TestIssuer } from '../helpers/test-issuer.ts';

describe('server: anonymous discovery (CELLCDS_ANONYMOUS_DISCOVERY_TENANT)', function () {
  this.timeout(60_000);
  let t: TestApp;
  let off: TestApp;
  let issuer: TestIssuer;

  before(async () => {
    const env = { CELLCDS_SEED_DEMO: 'false' };
    t = await buildTestApp({ ...env, CELLCDS_ANONYMOUS_DISCOVERY_TENANT: 'open-clinic' });
    off = await buildTestApp(env);
    for (const app of [t, off]) {
      expect((await app.uploadPack(tinyPack('anon'))).status).to.equal(201);
    }
    issuer = await t.addTenant('open-clinic', {
      subscriptions: [{ pack: 'anon', version: '1.0.0' }],
    });
    await t.addTenant('other-clinic', { subscriptions: [] });
    await off.addTenant('open-clinic', { subscriptions: [{ pack: 'anon', version: '1.0.0' }] });
  });
  after(async () => {
    await t.close();
    await off.close();
  });

  it("lists the configured tenant's services to a request without Authorization", async () => {
    const res = await request(t.app).get('/cds-services');
    expect(res.status, JSON.stringify(res.body)).to.equal(200);
    const ids = (res.body.services as Array<{ id: string }>).map((s) => s.id);
    expect(ids.sort()).to.deep.equal(['anon-order-sign', 'anon-patient-view']);
  });

  it('is off by default: 401 without a JWT', async () => {
    const res = await request(off.app).get('/cds-services');
    expect(res.status).to.equal(401);
  });

  it('verifies a request that sends a token: a bad one is refused, not served anonymously', async () => {
    const res = await request(t.app)
      .get('/cds-services')
      .set('authorization', 'Bearer not.a.token');
    expect(res.status).to.equal(401);
    const good = await request(t.app)
      .get('/cds-services')
      .set('authorization', `Bearer ${await issuer.sign({ aud: `${PUBLIC_URL}/cds-services` })}`);
    expect(good.status).to.equal(200);
  });

  it('never opens a service call or feedback without the JWT', async () => {
    const call = await request(t.app)
      .post('/cds-services/anon-order-sign')
      .send(warfarinNsaidRequest());
    expect(call.status).to.equal(401);
    const feedback = await request(t.app)
      .post('/cds-services/anon-order-sign/feedback')
      .send({ feedback: [] });
    expect(feedback.status).to.equal(401);
  });

  it('answers 401 while the tenant is suspended', async () => {
    const op = (r: request.Test) => r.set('authorization', `Bearer ${t.adminToken}`);
    expect((await op(request(t.app).post('/admin/tenants/open-clinic/suspend'))).status).to.equal(
      200,
    );
    try {
      expect((await request(t.app).get('/cds-services')).status).to.equal(401);
    } finally {
      await op(request(t.app).post('/admin/tenants/open-clinic/resume'));
    }
    expect((await request(t.app).get('/cds-services')).status).to.equal(200);
  });

  it('answers 401 when the configured tenant does not exist', async () => {
    const ghost = await buildTestApp({
      CELLCDS_SEED_DEMO: 'false',
      CELLCDS_ANONYMOUS_DISCOVERY_TENANT: 'no-such-clinic',
    });
    try {
      expect((await request(ghost.app).get('/cds-services')).status).to.equal(401);
    } finally {
      await ghost.close();
    }
  });

  it('refuses a value that is not a tenant id at start', async () => {
    const err = await buildTestApp({ CELLCDS_ANONYMOUS_DISCOVERY_TENANT: 'Not A Tenant' }).then(
      async (app) => {
        await app.close();
        return undefined;
      },
      (e: unknown) => e,
    );
    expect(String(err)).to.include('CELLCDS_ANONYMOUS_DISCOVERY_TENANT');
  });
});
