/**
 * A refused admin access (403) is audited: `admin.forbidden` in the control-plane audit, with
 * the actor (role:tokenId), the refused action, the target tenant (when it is a registered one,
 * so the target tenant's auditors see it in their trail), the method and the route pattern
 * (never the raw URL and its ids) and the request id; within the refusal audit budget per second,
 * beyond it as counts that keep the actor and the target tenant. Its log line names the principal
 * and the target tenant.
 */
import { expect } from 'chai';
import request from 'supertest';
import { tinyPack } from '../helpers/packs.ts';
import { buildTestApp, type TestApp } from '../helpers/test-app.ts';
import type { StoredAuditEvent } from '../../tenants/index.ts';

const BUDGET = 3;
const RECORD_ID = '0f2c7a9e-5b1d-4c8e-9a3f-6d2b1e0c4a77';

interface LogLine {
  msg: string;
  requestId?: string;
  status?: number;
  principal?: string;
  role?: string;
  targetTenant?: string;
  route?: string;
}

describe('server/ admin refusals (403) are audited', () => {
  let t: TestApp;
  let adminA: { id: string; token: string };
  let auditorB: { id: string; token: string };
  let author: { id: string; token: string };
  const op = (r: request.Test) => r.set('authorization', `Bearer ${t.adminToken}`);

  before(async () => {
    t = await buildTestApp({ CELLCDS_AUTH_FAILURE_AUDIT_PER_SECOND: String(BUDGET) });
    expect((await t.uploadPack(tinyPack('alpha'))).status).to.equal(201);
    await t.addTenant('hosp-a');
    await t.addTenant('hosp-b');
    const issue = async (body: object) => {
      const res = await op(request(t.app).post('/admin/tokens')).send(body);
      expect(res.status).to.equal(201);
      return res.body as { id: string; token: string };
    };
    adminA = await issue({ role: 'tenant-admin', tenant: 'hosp-a' });
    auditorB = await issue({ role: 'auditor', tenant: 'hosp-b' });
    author = await issue({ role: 'rule-author' });
  });
  after(async () => t.close());

  const forbidden = async (): Promise<StoredAuditEvent[]> => {
    await t.deps.failureAudit.flush();
    return t.deps.controlPlane.audit.list({ type: 'admin.forbidden' });
  };
  const byRequest = async (requestId: string) =>
    (await forbidden()).find((e) => e.detail?.requestId === requestId);

  it("audits a tenant-admin of A reading B's record: actor, action, target, route, request id", async () => {
    const res = await request(t.app)
      .get(`/admin/tenants/hosp-b/invocations/${RECORD_ID}`)
      .set('authorization', `Bearer ${adminA.token}`);
    expect(res.status).to.equal(403);
    const requestId = res.headers['x-request-id'] as string;
    const event = await byRequest(requestId);
    expect(event, 'admin.forbidden event').to.not.equal(undefined);
    expect(event).to.deep.include({
      type: 'admin.forbidden',
      outcome: 'failure',
      tenant: 'hosp-b',
      actor: `tenant-admin:${adminA.id}`,
    });
    expect(event?.detail).to.deep.equal({
      reason: 'records:read',
      actorTenant: 'hosp-a',
      method: 'GET',
      endpoint: '/admin/tenants/:id/invocations/:rid',
      requestId,
    });
    // The route pattern, never the record id the client put in its path.
    expect(JSON.stringify(event)).to.not.include(RECORD_ID);
  });

  it('audits every kind of cross-tenant attempt on B: keys, audit trail, subscriptions, tokens, replay', async () => {
    const as = (r: request.Test) => r.set('authorization', `Bearer ${adminA.token}`);
    const attempts: Array<[request.Test, string, string, string]> = [
      [
        as(request(t.app).get('/admin/tenants/hosp-b/keys')),
        'GET',
        '/admin/tenants/:id/keys',
        'tenant:read',
      ],
      [
        as(request(t.app).get('/admin/tenants/hosp-b/audit/verify')),
        'GET',
        '/admin/tenants/:id/audit/verify',
        'audit:read',
      ],
      [as(request(t.app).get('/admin/audit?tenant=hosp-b')), 'GET', '/admin/audit', 'audit:read'],
      [
        as(request(t.app).put('/admin/tenants/hosp-b/subscriptions')).send([
          { pack: 'alpha', version: '1.0.0' },
        ]),
        'PUT',
        '/admin/tenants/:id/subscriptions',
        'tenant:subscriptions',
      ],
      [
        as(request(t.app).post('/admin/tokens')).send({ role: 'auditor', tenant: 'hosp-b' }),
        'POST',
        '/admin/tokens',
        'token:issue',
      ],
      [
        as(request(t.app).post(`/admin/tenants/hosp-b/invocations/${RECORD_ID}/replay`)),
        'POST',
        '/admin/tenants/:id/invocations/:rid/replay',
        'records:read',
      ],
    ];
    for (const [req, method, endpoint, action] of attempts) {
      // One after another: within the budget of one second only when spread out.
      await new Promise((resolve) => setTimeout(resolve, 1000 / BUDGET + 10));
      const res = await req;
      expect(res.status, endpoint).to.equal(403);
      const event = await byRequest(res.headers['x-request-id'] as string);
      expect(event, `${method} ${endpoint}`).to.not.equal(undefined);
      expect(event?.tenant, endpoint).to.equal('hosp-b');
      expect(event?.actor).to.equal(`tenant-admin:${adminA.id}`);
      expect(event?.detail).to.include({ reason: action, method, endpoint });
    }
    // A token of another tenant answers like an unknown id (404: token ids are not confirmed to
    // outsiders), and the attempt is audited as refused all the same.
    await new Promise((resolve) => setTimeout(resolve, 1000 / BUDGET + 10));
    const probe = await as(request(t.app).delete(`/admin/tokens/${auditorB.id}`));
    const unknown = await as(request(t.app).delete('/admin/tokens/tok_000000000000000000000000'));
    expect(probe.status).to.equal(404);
    expect(probe.body).to.deep.equal(unknown.body);
    const event = await byRequest(probe.headers['x-request-id'] as string);
    expect(event?.tenant).to.equal('hosp-b');
    expect(event?.actor).to.equal(`tenant-admin:${adminA.id}`);
    expect(event?.detail).to.include({
      reason: 'token:revoke',
      method: 'DELETE',
      endpoint: '/admin/tokens/:id',
    });
    // B's auditor sees them in B's trail.
    const seen = await request(t.app)
      .get('/admin/audit?tenant=hosp-b&type=admin.forbidden')
      .set('authorization', `Bearer ${auditorB.token}`);
    expect(seen.status).to.equal(200);
    expect(seen.body.events.length).to.be.at.least(attempts.length + 1);
    // ...and B's token was not revoked, B's subscriptions not changed.
    const tokens = await op(request(t.app).get('/admin/tokens'));
    expect(tokens.body.tokens.find((x: { id: string }) => x.id === auditorB.id).revokedAt).to.equal(
      undefined,
    );
  });

  it('audits a refusal by role (no tenant): the action refused, no target', async () => {
    await new Promise((resolve) => setTimeout(resolve, 1100));
    const res = await request(t.app)
      .get('/admin/tenants')
      .set('authorization', `Bearer ${author.token}`);
    expect(res.status).to.equal(403);
    const event = await byRequest(res.headers['x-request-id'] as string);
    expect(event?.actor).to.equal(`rule-author:${author.id}`);
    expect(event?.tenant).to.equal(undefined);
    expect(event?.detail).to.include({
      reason: 'tenant:list',
      method: 'GET',
      endpoint: '/admin/tenants',
    });
  });

  it('names an unregistered target only in detail (never as the event tenant)', async () => {
    await new Promise((resolve) => setTimeout(resolve, 1100));
    const res = await request(t.app)
      .get('/admin/tenants/no-such-hosp/keys')
      .set('authorization', `Bearer ${adminA.token}`);
    expect(res.status).to.equal(403);
    const event = await byRequest(res.headers['x-request-id'] as string);
    expect(event?.tenant).to.equal(undefined);
    expect(event?.detail).to.include({ targetTenant: 'no-such-hosp' });
  });

  it('counts refusals by action in /metrics', async () => {
    const count = async () => {
      const text = (await request(t.app).get('/metrics')).text;
      const line = text
        .split('\n')
        .find(
          (l) =>
            l.startsWith('cellcds_admin_forbidden_total{') && l.includes('action="records:read"'),
        );
      return line === undefined ? 0 : Number(line.split(' ').at(-1));
    };
    const before = await count();
    const res = await request(t.app)
      .get(`/admin/tenants/hosp-b/invocations/${RECORD_ID}`)
      .set('authorization', `Bearer ${adminA.token}`);
    expect(res.status).to.equal(403);
    expect(await count()).to.equal(before + 1);
  });

  it('logs the 403 with the principal and the target tenant', async () => {
    const res = await request(t.app)
      .get(`/admin/tenants/hosp-b/invocations/${RECORD_ID}`)
      .set('authorization', `Bearer ${adminA.token}`);
    expect(res.status).to.equal(403);
    const requestId = res.headers['x-request-id'] as string;
    const line = t.logLines
      .map((l) => JSON.parse(l) as LogLine)
      .find((l) => l.msg === 'request refused' && l.requestId === requestId);
    expect(line).to.include({
      status: 403,
      principal: adminA.id,
      role: 'tenant-admin',
      targetTenant: 'hosp-b',
      route: '/admin/tenants/:id/invocations/:rid',
    });
  });

  it('audits a flood of refusals within the budget, the rest as counts keeping actor and target', async () => {
    await new Promise((resolve) => setTimeout(resolve, 1100));
    await t.deps.failureAudit.flush();
    const before = (await forbidden()).length;
    const FLOOD = 30;
    const responses = await Promise.all(
      Array.from({ length: FLOOD }, () =>
        request(t.app)
          .get(`/admin/tenants/hosp-b/invocations/${RECORD_ID}`)
          .set('authorization', `Bearer ${adminA.token}`),
      ),
    );
    expect(responses.map((r) => r.status)).to.deep.equal(Array.from({ length: FLOOD }, () => 403));
    const single = (await forbidden()).length - before;
    const counted = await t.deps.controlPlane.audit.list({ type: 'admin.forbidden.suppressed' });
    expect(single).to.be.at.least(1).and.below(FLOOD);
    expect(counted.length).to.be.at.least(1);
    expect(single + counted.reduce((n, e) => n + Number(e.detail?.count), 0)).to.equal(FLOOD);
    for (const e of counted) {
      expect(e).to.deep.include({
        tenant: 'hosp-b',
        actor: `tenant-admin:${adminA.id}`,
        outcome: 'failure',
      });
      expect(e.detail).to.have.keys(['reason', 'count', 'from', 'to']);
      expect(e.detail?.reason).to.equal('records:read');
    }
  });
});
