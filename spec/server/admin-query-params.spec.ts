import { expect } from 'chai';
import request from 'supertest';
import { buildTestApp, PUBLIC_URL, type TestApp } from '../helpers/test-app.ts';
import { tinyPack, warfarinNsaidRequest } from '../helpers/packs.ts';

/**
 * A query parameter an admin route does not read is refused (400 naming it and the ones the
 * route reads), never ignored: `?patient=...` ignored answers with every record while the caller
 * believes it filtered. A parameter given twice is refused too (a list is not a filter).
 */
describe('admin routes refuse query parameters they do not read', function () {
  this.timeout(60_000);
  let t: TestApp;
  let adminA: string;
  const as = (token: string) => (r: request.Test) => r.set('authorization', `Bearer ${token}`);
  const op = (r: request.Test) => as(t.adminToken)(r);

  before(async () => {
    t = await buildTestApp();
    expect((await t.uploadPack(tinyPack('tiny'))).status).to.equal(201);
    const issuer = await t.addTenant('acme', {
      subscriptions: [{ pack: 'tiny', version: '1.0.0' }],
    });
    adminA = (
      await op(request(t.app).post('/admin/tokens')).send({ role: 'tenant-admin', tenant: 'acme' })
    ).body.token as string;
    const call = await request(t.app)
      .post('/cds-services/tiny-order-sign')
      .set(
        'authorization',
        `Bearer ${await issuer.sign({ aud: `${PUBLIC_URL}/cds-services/tiny-order-sign` })}`,
      )
      .send(warfarinNsaidRequest());
    expect(call.status).to.equal(200);
  });
  after(async () => t.close());

  const refusals: Array<[string, () => request.Test, string, string[]]> = [
    [
      'GET /tenants/:id/invocations?patient=',
      () => as(adminA)(request(t.app).get('/admin/tenants/acme/invocations?patient=zq1941')),
      'patient',
      ['from', 'to', 'hook', 'limit'],
    ],
    [
      'GET /tenants/:id/invocations with a known and an unknown parameter',
      () =>
        as(adminA)(
          request(t.app).get('/admin/tenants/acme/invocations?hook=order-sign&patientId=zq1941'),
        ),
      'patientId',
      ['from', 'to', 'hook', 'limit'],
    ],
    [
      'GET /audit?actor=',
      () => op(request(t.app).get('/admin/audit?actor=someone')),
      'actor',
      ['from', 'to', 'tenant', 'type', 'requestId'],
    ],
    [
      'GET /tokens?unused=',
      () => op(request(t.app).get('/admin/tokens?unused=30')),
      'unused',
      ['unusedForDays'],
    ],
  ];
  for (const [name, send, param, known] of refusals) {
    it(`refuses ${name} with 400 naming the parameter and the known ones`, async () => {
      const res = await send();
      expect(res.status, JSON.stringify(res.body)).to.equal(400);
      expect(res.body.error).to.equal('invalid_request');
      expect(res.body.field).to.equal(param);
      expect(res.body.known).to.deep.equal(known);
      expect(res.body.message).to.include(param);
      for (const k of known) {
        expect(res.body.message).to.include(k);
      }
      expect(res.body).to.not.have.property('invocations');
      expect(res.body).to.not.have.property('events');
      expect(res.body).to.not.have.property('tokens');
    });
  }

  it('refuses a filter given twice on the invocation list (a list is not a filter)', async () => {
    const res = await as(adminA)(
      request(t.app).get('/admin/tenants/acme/invocations?hook=order-sign&hook=patient-view'),
    );
    expect(res.status).to.equal(400);
    expect(res.body.field).to.equal('hook');
  });

  it('still filters with the known parameters', async () => {
    const all = await as(adminA)(request(t.app).get('/admin/tenants/acme/invocations'));
    expect(all.status).to.equal(200);
    expect(all.body.invocations).to.have.length(1);
    const none = await as(adminA)(
      request(t.app).get('/admin/tenants/acme/invocations?hook=patient-view&limit=5'),
    );
    expect(none.status).to.equal(200);
    expect(none.body.invocations).to.deep.equal([]);
    const audit = await op(request(t.app).get('/admin/audit?tenant=acme&type=records.list'));
    expect(audit.status).to.equal(200);
    expect(audit.body.events.length).to.be.greaterThan(0);
  });

  it('refuses an unknown parameter on a subscription change, changing nothing', async () => {
    const res = await op(
      request(t.app).put('/admin/tenants/acme/subscriptions/tiny?existingonly=true'),
    ).send({ version: '1.0.0' });
    expect(res.status).to.equal(400);
    expect(res.body.field).to.equal('existingonly');
    expect(res.body.known).to.deep.equal(['existingOnly']);
  });
});
