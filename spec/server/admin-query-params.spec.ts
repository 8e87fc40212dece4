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
  let invocationId: string;
  let jobId: string;
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
    const list = await as(adminA)(request(t.app).get('/admin/tenants/acme/invocations'));
    invocationId = (list.body.invocations as Array<{ id: string }>)[0]!.id;
    const rotation = await op(request(t.app).post('/admin/tenants/acme/keys/rotate')).send({});
    expect(rotation.status, JSON.stringify(rotation.body)).to.equal(202);
    jobId = rotation.body.id as string;
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

  // Routes that read no query parameter refuse any (`?tenant=` on the tenant list, `?version=`
  // on a record read: the answer would look filtered, or like the version asked for). Read as
  // the operator, or (records:read) as acme's tenant admin.
  const paramless: Array<[string, () => string, string, 'tenant'?]> = [
    ['GET /tenants', () => '/admin/tenants', 'tenants'],
    ['GET /tenants/:id', () => '/admin/tenants/acme', 'id'],
    ['GET /rule-packs', () => '/admin/rule-packs', 'packs'],
    [
      'GET /rule-packs/:id/subscriptions',
      () => '/admin/rule-packs/tiny/subscriptions',
      'subscriptions',
    ],
    ['GET /rule-packs/:id/versions/:version', () => '/admin/rule-packs/tiny/versions/1.0.0', 'id'],
    ['GET /tenants/:id/keys', () => '/admin/tenants/acme/keys', 'tenant'],
    ['GET /jobs/:jobId', () => `/admin/jobs/${jobId}`, 'id'],
    [
      'GET /tenants/:id/invocations/:rid',
      () => `/admin/tenants/acme/invocations/${invocationId}`,
      'id',
      'tenant',
    ],
  ];
  for (const [name, path, member, who] of paramless) {
    it(`refuses ${name}?tenant=other with 400 naming the parameter (the route reads none)`, async () => {
      const send = who === 'tenant' ? as(adminA) : op;
      const ok = await send(request(t.app).get(path()));
      expect(ok.status, JSON.stringify(ok.body)).to.equal(200);
      expect(ok.body).to.have.property(member);
      for (const query of ['tenant=other', 'version=2.0.0&x=1']) {
        const res = await send(request(t.app).get(`${path()}?${query}`));
        const param = query.slice(0, query.indexOf('='));
        expect(res.status, JSON.stringify(res.body)).to.equal(400);
        expect(res.body.error).to.equal('invalid_request');
        expect(res.body.field).to.equal(param);
        expect(res.body.known).to.deep.equal([]);
        expect(res.body.message).to.include(`'${param}'`).and.include('reads none');
        expect(res.body).to.not.have.property(member);
      }
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

  // Writes too: `DELETE /tenants/acme?dryRun=true` ignored would crypto-shred the tenant; a
  // `?emergency=true` ignored would run a scheduled rotation. Refused before the service acts.
  const writes: Array<[string, () => request.Test]> = [
    [
      'POST /tenants?dryRun=true',
      () => op(request(t.app).post('/admin/tenants?dryRun=true')).send({}),
    ],
    [
      'PATCH /tenants/:id?dryRun=true',
      () => op(request(t.app).patch('/admin/tenants/acme?dryRun=true')).send({ name: 'x' }),
    ],
    [
      'POST /tenants/:id/suspend?dryRun=true',
      () => op(request(t.app).post('/admin/tenants/acme/suspend?dryRun=true')),
    ],
    [
      'POST /tenants/:id/resume?dryRun=true',
      () => op(request(t.app).post('/admin/tenants/acme/resume?dryRun=true')),
    ],
    [
      'POST /tenants/:id/failover?region=x',
      () => op(request(t.app).post('/admin/tenants/acme/failover?region=x')).send({}),
    ],
    [
      'DELETE /tenants/:id/failover?dryRun=true',
      () => op(request(t.app).delete('/admin/tenants/acme/failover?dryRun=true')),
    ],
    [
      'PUT /tenants/:id/subscriptions?dryRun=true',
      () => op(request(t.app).put('/admin/tenants/acme/subscriptions?dryRun=true')).send([]),
    ],
    [
      'DELETE /tenants/:id/subscriptions/:pack?dryRun=true',
      () => op(request(t.app).delete('/admin/tenants/acme/subscriptions/tiny?dryRun=true')),
    ],
    [
      'POST /tokens?dryRun=true',
      () =>
        op(request(t.app).post('/admin/tokens?dryRun=true')).send({
          role: 'auditor',
          tenant: 'acme',
        }),
    ],
    [
      'DELETE /tokens/:id?dryRun=true',
      () => op(request(t.app).delete('/admin/tokens/nope?dryRun=true')),
    ],
    [
      'POST /rule-packs?dryRun=true',
      () =>
        op(request(t.app).post('/admin/rule-packs?dryRun=true'))
          .type('application/json')
          .send(JSON.stringify(tinyPack('tiny-2'))),
    ],
    [
      'POST /tenants/:id/invocations/:rid/replay?version=2',
      () =>
        as(adminA)(
          request(t.app).post(`/admin/tenants/acme/invocations/${invocationId}/replay?version=2`),
        ),
    ],
    [
      'POST /tenants/:id/keys/rotate?emergency=true',
      () => op(request(t.app).post('/admin/tenants/acme/keys/rotate?emergency=true')).send({}),
    ],
    [
      'POST /regions/:region/kek/rotate?dryRun=true',
      () => op(request(t.app).post('/admin/regions/local/kek/rotate?dryRun=true')),
    ],
    [
      'DELETE /tenants/:id?dryRun=true',
      () => op(request(t.app).delete('/admin/tenants/acme?dryRun=true')),
    ],
    [
      'POST /tenants/:id/backups?dryRun=true',
      () => op(request(t.app).post('/admin/tenants/acme/backups?dryRun=true')),
    ],
    [
      'POST /restores?dryRun=true',
      () =>
        op(request(t.app).post('/admin/restores?dryRun=true')).send({
          tenant: 'acme',
          backup: 'nope',
        }),
    ],
  ];
  it('refuses a query parameter on every write route, before anything is done', async () => {
    const before = await op(request(t.app).get('/admin/audit'));
    const lastSeq = Math.max(...(before.body.events as Array<{ seq: number }>).map((e) => e.seq));
    for (const [name, send] of writes) {
      const res = await send();
      const param = name.slice(name.indexOf('?') + 1, name.indexOf('=', name.indexOf('?')));
      expect(res.status, `${name}: ${JSON.stringify(res.body)}`).to.equal(400);
      expect(res.body.field, name).to.equal(param);
      expect(res.body.known, name).to.deep.equal([]);
    }
    // Nothing changed: acme is registered, active, subscribed, with no other pack uploaded.
    const acme = await op(request(t.app).get('/admin/tenants/acme'));
    expect(acme.status).to.equal(200);
    expect(acme.body.status).to.equal('active');
    expect(acme.body.name).to.not.equal('x');
    expect(acme.body.subscriptions).to.have.length(1);
    const packs = await op(request(t.app).get('/admin/rule-packs'));
    expect(JSON.stringify(packs.body)).to.not.include('tiny-2');
    // No change was made, so none was audited as done (refusals may be).
    const after = await op(request(t.app).get('/admin/audit'));
    const done = (
      after.body.events as Array<{ seq: number; outcome: string; type: string }>
    ).filter((e) => e.seq > lastSeq && e.outcome === 'success' && e.type !== 'records.list');
    expect(done.map((e) => e.type)).to.deep.equal([]);
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
