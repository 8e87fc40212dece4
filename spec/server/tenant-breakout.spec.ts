import { expect } from 'chai';
import request from 'supertest';
import { buildTestApp, PUBLIC_URL, type TestApp } from '../helpers/test-app.ts';
import { tinyPack, warfarinNsaidRequest } from '../helpers/packs.ts';
import type { TestIssuer } from '../helpers/test-issuer.ts';

describe('tenant break-out', () => {
  let t: TestApp;
  let a: TestIssuer;
  let b: TestIssuer;
  let adminA: string;
  let auditorA: string;

  before(async () => {
    t = await buildTestApp();
    expect((await t.uploadPack(tinyPack('alpha'))).status).to.equal(201);
    expect((await t.uploadPack(tinyPack('beta'))).status).to.equal(201);
    a = await t.addTenant('tenant-a', { subscriptions: [{ pack: 'alpha', version: '1.0.0' }] });
    b = await t.addTenant('tenant-b', { subscriptions: [{ pack: 'beta', version: '1.0.0' }] });
    const op = (r: request.Test) => r.set('authorization', `Bearer ${t.adminToken}`);
    adminA = (
      await op(request(t.app).post('/admin/tokens')).send({
        role: 'tenant-admin',
        tenant: 'tenant-a',
      })
    ).body.token;
    auditorA = (
      await op(request(t.app).post('/admin/tokens')).send({ role: 'auditor', tenant: 'tenant-a' })
    ).body.token;
    expect(adminA).to.be.a('string');
    expect(auditorA).to.be.a('string');
  });
  after(async () => t.close());

  it("never lists tenant B's services to tenant A", async () => {
    const res = await request(t.app)
      .get('/cds-services')
      .set('authorization', `Bearer ${await a.sign({ aud: `${PUBLIC_URL}/cds-services` })}`);
    expect(res.status).to.equal(200);
    const ids = res.body.services.map((s: { id: string }) => s.id);
    expect(ids).to.deep.equal(['alpha-order-sign', 'alpha-patient-view']);
  });

  it("refuses tenant A's valid token on tenant B's service (404, as if it did not exist)", async () => {
    const url = `${PUBLIC_URL}/cds-services/beta-order-sign`;
    const res = await request(t.app)
      .post('/cds-services/beta-order-sign')
      .set('authorization', `Bearer ${await a.sign({ aud: url })}`)
      .send(warfarinNsaidRequest());
    expect(res.status).to.equal(404);
  });

  it("refuses tenant A's token on tenant B's feedback endpoint", async () => {
    const url = `${PUBLIC_URL}/cds-services/beta-order-sign/feedback`;
    const res = await request(t.app)
      .post('/cds-services/beta-order-sign/feedback')
      .set('authorization', `Bearer ${await a.sign({ aud: url })}`)
      .send({
        feedback: [
          {
            card: crypto.randomUUID(),
            outcome: 'overridden',
            outcomeTimestamp: '2026-11-26T10:05:31Z',
          },
        ],
      });
    expect(res.status).to.equal(404);
  });

  it("refuses tenant A's issuer claiming tenant B even with a valid signature", async () => {
    const url = `${PUBLIC_URL}/cds-services/beta-order-sign`;
    const res = await request(t.app)
      .post('/cds-services/beta-order-sign')
      .set('authorization', `Bearer ${await a.sign({ aud: url, tenant: 'tenant-b' })}`)
      .send(warfarinNsaidRequest());
    expect(res.status).to.equal(401);
  });

  it("refuses a tenant-admin token of A on B's tenant, subscriptions and tokens", async () => {
    const as = (r: request.Test) => r.set('authorization', `Bearer ${adminA}`);
    expect((await as(request(t.app).get('/admin/tenants/tenant-b'))).status).to.equal(403);
    expect(
      (await as(request(t.app).patch('/admin/tenants/tenant-b')).send({ name: 'pwned' })).status,
    ).to.equal(403);
    expect(
      (
        await as(request(t.app).put('/admin/tenants/tenant-b/subscriptions')).send([
          { pack: 'alpha', version: '1.0.0' },
        ])
      ).status,
    ).to.equal(403);
    expect(
      (
        await as(request(t.app).post('/admin/tokens')).send({
          role: 'tenant-admin',
          tenant: 'tenant-b',
        })
      ).status,
    ).to.equal(403);
    expect((await as(request(t.app).post('/admin/tenants/tenant-b/suspend'))).status).to.equal(403);
    // ...while its own tenant works
    expect((await as(request(t.app).get('/admin/tenants/tenant-a'))).status).to.equal(200);
    const list = await as(request(t.app).get('/admin/tenants'));
    expect(list.body.tenants.map((x: { id: string }) => x.id)).to.deep.equal(['tenant-a']);
    // B is unchanged
    const bNow = await request(t.app)
      .get('/admin/tenants/tenant-b')
      .set('authorization', `Bearer ${t.adminToken}`);
    expect(bNow.body.name).to.equal('Tenant tenant-b');
    expect(bNow.body.subscriptions).to.deep.equal([{ pack: 'beta', version: '1.0.0' }]);
  });

  it('refuses an auditor of A to change anything, or to read B', async () => {
    const as = (r: request.Test) => r.set('authorization', `Bearer ${auditorA}`);
    expect(
      (await as(request(t.app).patch('/admin/tenants/tenant-a')).send({ name: 'x' })).status,
    ).to.equal(403);
    expect((await as(request(t.app).get('/admin/tenants/tenant-b'))).status).to.equal(403);
    expect(
      (await as(request(t.app).post('/admin/rule-packs')).send(tinyPack('gamma'))).status,
    ).to.equal(403);
  });

  it('keeps working for B after A was suspended', async () => {
    const op = (r: request.Test) => r.set('authorization', `Bearer ${t.adminToken}`);
    expect((await op(request(t.app).post('/admin/tenants/tenant-a/suspend'))).status).to.equal(200);
    const urlA = `${PUBLIC_URL}/cds-services/alpha-order-sign`;
    const resA = await request(t.app)
      .post('/cds-services/alpha-order-sign')
      .set('authorization', `Bearer ${await a.sign({ aud: urlA })}`)
      .send(warfarinNsaidRequest());
    expect(resA.status).to.equal(401);
    const urlB = `${PUBLIC_URL}/cds-services/beta-order-sign`;
    const resB = await request(t.app)
      .post('/cds-services/beta-order-sign')
      .set('authorization', `Bearer ${await b.sign({ aud: urlB })}`)
      .send(warfarinNsaidRequest());
    expect(resB.status).to.equal(200);
    expect((await op(request(t.app).post('/admin/tenants/tenant-a/resume'))).status).to.equal(200);
  });

  // One tenant's EHR minting tokens fast (or long-lived) may not take the replay cache's last
  // share of places: its next token is refused (fail closed, audited in its trail), the other
  // tenants go on.
  describe('the replay cache, shared by every tenant', () => {
    let r: TestApp;
    let ra: TestIssuer;
    let rb: TestIssuer;
    before(async () => {
      r = await buildTestApp({
        CELLCDS_REPLAY_CACHE_MAX_ENTRIES: '1000',
        CELLCDS_REPLAY_CACHE_MAX_PER_ISSUER: '500',
      });
      expect((await r.uploadPack(tinyPack('alpha'))).status).to.equal(201);
      expect((await r.uploadPack(tinyPack('beta'))).status).to.equal(201);
      ra = await r.addTenant('tenant-a', { subscriptions: [{ pack: 'alpha', version: '1.0.0' }] });
      rb = await r.addTenant('tenant-b', { subscriptions: [{ pack: 'beta', version: '1.0.0' }] });
    });
    after(async () => r.close());

    const call = async (issuer: TestIssuer, service: string) =>
      request(r.app)
        .post(`/cds-services/${service}`)
        .set(
          'authorization',
          `Bearer ${await issuer.sign({ aud: `${PUBLIC_URL}/cds-services/${service}`, exp: Math.floor(Date.now() / 1000) + 3000 })}`,
        )
        .send(warfarinNsaidRequest());

    it("refuses A's tokens once only the last share is free, and never B's", async () => {
      // A's EHR sends 500 tokens (discovery calls, cheap): half the cache, its share.
      const discovery = async () =>
        (
          await request(r.app)
            .get('/cds-services')
            .set(
              'authorization',
              `Bearer ${await ra.sign({ aud: `${PUBLIC_URL}/cds-services`, exp: Math.floor(Date.now() / 1000) + 3000 })}`,
            )
        ).status;
      for (let i = 0; i < 500; i += 50) {
        const statuses = await Promise.all(Array.from({ length: 50 }, discovery));
        expect(statuses.every((status) => status === 200)).to.equal(true);
      }
      const refused = await call(ra, 'alpha-order-sign');
      expect(refused.status).to.equal(401);
      expect(refused.body).to.deep.equal({ error: 'invalid_token', message: 'invalid token' });
      for (let i = 0; i < 3; i++) {
        expect((await call(rb, 'beta-order-sign')).status).to.equal(200);
      }
      const events = await r.deps.controlPlane.audit.list({ type: 'auth.failure' });
      const quota = events.filter((e) => e.detail?.reason === 'replay_quota');
      expect(quota.map((e) => e.tenant)).to.deep.equal(['tenant-a']);
      const metrics = await request(r.app).get('/metrics');
      expect(metrics.text).to.match(
        /^cellcds_auth_failures_total\{[^}]*reason="replay_quota"[^}]*\} 1$/m,
      );
    });
  });
});
