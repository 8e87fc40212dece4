/**
 * `GET /admin/audit?requestId=...`: the request id a refusal names (`X-Request-Id`) finds its
 * audit event, alone; combined with the other filters; a value that is no request id is a 400
 * naming the field; tenant-scoped principals still see only their own tenant's events.
 */
import { expect } from 'chai';
import request from 'supertest';
import { buildTestApp, type TestApp } from '../helpers/test-app.ts';

describe('server/ GET /admin/audit?requestId=', () => {
  let t: TestApp;
  let adminA: string;
  let auditorB: string;
  /** The request id of a refused CDS call (no tenant: its token proved none). */
  let refusedCall: string;
  /** The request id of hosp-a's tenant-admin refused on hosp-b (audited under hosp-b). */
  let refusedAdmin: string;

  const audit = (query: string, token = t.adminToken) =>
    request(t.app).get(`/admin/audit?${query}`).set('authorization', `Bearer ${token}`);

  before(async () => {
    t = await buildTestApp({ CELLCDS_SEED_DEMO: 'false' });
    await t.addTenant('hosp-a');
    await t.addTenant('hosp-b');
    const issue = async (body: object) => {
      const res = await request(t.app)
        .post('/admin/tokens')
        .set('authorization', `Bearer ${t.adminToken}`)
        .send(body);
      expect(res.status).to.equal(201);
      return (res.body as { token: string }).token;
    };
    adminA = await issue({ role: 'tenant-admin', tenant: 'hosp-a' });
    auditorB = await issue({ role: 'auditor', tenant: 'hosp-b' });

    const call = await request(t.app)
      .get('/cds-services')
      .set('authorization', 'Bearer not.a.token');
    expect(call.status).to.equal(401);
    refusedCall = call.headers['x-request-id'] as string;
    const forbidden = await request(t.app)
      .get('/admin/tenants/hosp-b/keys')
      .set('authorization', `Bearer ${adminA}`);
    expect(forbidden.status).to.equal(403);
    refusedAdmin = forbidden.headers['x-request-id'] as string;
    // Some more refusals: the filter must pick one request out of many.
    for (let i = 0; i < 3; i++) {
      expect(
        (await request(t.app).get('/cds-services').set('authorization', 'Bearer x.y.z')).status,
      ).to.equal(401);
    }
    await t.deps.failureAudit.flush();
  });
  after(async () => t.close());

  it('finds the audit event of a refused call by the request id it was given', async () => {
    const res = await audit(`requestId=${refusedCall}`);
    expect(res.status, JSON.stringify(res.body)).to.equal(200);
    const events = res.body.events as Array<{ type: string; detail: Record<string, unknown> }>;
    expect(events).to.have.length(1);
    expect(events[0]).to.deep.include({ type: 'auth.failure', outcome: 'failure' });
    expect(events[0]?.detail.requestId).to.equal(refusedCall);
    expect(events[0]?.detail.reason).to.be.a('string');
  });

  it('combines with type and tenant', async () => {
    const ok = await audit(`requestId=${refusedAdmin}&type=admin.forbidden&tenant=hosp-b`);
    expect(ok.status).to.equal(200);
    expect(ok.body.events).to.have.length(1);
    expect(ok.body.events[0].detail.requestId).to.equal(refusedAdmin);
    expect((await audit(`requestId=${refusedAdmin}&type=auth.failure`)).body.events).to.deep.equal(
      [],
    );
  });

  it('answers an empty list for a request id nothing was audited under', async () => {
    const res = await audit('requestId=00000000-0000-4000-8000-000000000000');
    expect(res.status).to.equal(200);
    expect(res.body.events).to.deep.equal([]);
  });

  const bad: Array<[string, string]> = [
    ['an empty value', 'requestId='],
    ['a LIKE wildcard', 'requestId=%25'],
    ['a quote', `requestId=abc%22`],
    ['a value over 64 characters', `requestId=${'a'.repeat(65)}`],
    ['the parameter twice', 'requestId=a&requestId=b'],
  ];
  for (const [name, query] of bad) {
    it(`refuses ${name}: 400 invalid_request naming requestId`, async () => {
      const res = await audit(query);
      expect(res.status, JSON.stringify(res.body)).to.equal(400);
      expect(res.body).to.include({ error: 'invalid_request', field: 'requestId' });
    });
  }

  for (const field of ['type', 'tenant', 'from', 'to']) {
    it(`refuses ${field} given twice (400 naming it), never dropping the filter`, async () => {
      const value = field === 'from' || field === 'to' ? '2026-01-01T00:00:00Z' : 'hosp-a';
      const res = await audit(`${field}=${value}&${field}=${value}`);
      expect(res.status, JSON.stringify(res.body)).to.equal(400);
      expect(res.body).to.include({ error: 'invalid_request', field });
    });
  }

  it("keeps tenant-scoped principals to their own tenant's events", async () => {
    // hosp-a's tenant-admin was refused on hosp-b: the event is hosp-b's, not hosp-a's.
    const own = await audit(`tenant=hosp-a&requestId=${refusedAdmin}`, adminA);
    expect(own.status).to.equal(200);
    expect(own.body.events).to.deep.equal([]);
    // Without its tenant, or with another one: refused, as without the filter.
    expect((await audit(`requestId=${refusedAdmin}`, adminA)).status).to.equal(403);
    expect((await audit(`tenant=hosp-b&requestId=${refusedAdmin}`, adminA)).status).to.equal(403);
    // The refused call proved no tenant: no tenant's principal sees it.
    expect(
      (await audit(`tenant=hosp-a&requestId=${refusedCall}`, adminA)).body.events,
    ).to.deep.equal([]);
    // hosp-b's auditor sees the refusal on its tenant.
    const b = await audit(`tenant=hosp-b&requestId=${refusedAdmin}`, auditorB);
    expect(b.status).to.equal(200);
    expect(b.body.events).to.have.length(1);
    expect(b.body.events[0]).to.deep.include({ type: 'admin.forbidden', tenant: 'hosp-b' });
  });
});
