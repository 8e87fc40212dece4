/**
 * A refused operator token (401) can be traced: its `admin.auth` failure event names the real
 * request id (the `X-Request-Id` the client got), the method and the admin route pattern (never
 * the raw URL), and tells a revoked token (`revoked`, with its token id) from an unknown one
 * (`unknown token`). Its log line names the route too.
 */
import { expect } from 'chai';
import request from 'supertest';
import { buildTestApp, type TestApp } from '../helpers/test-app.ts';
import type { StoredAuditEvent } from '../../tenants/index.ts';

interface LogLine {
  msg: string;
  requestId?: string;
  status?: number;
  route?: string;
}

const UNKNOWN = `ccds_${'A'.repeat(43)}`;
const RECORD_ID = '0f2c7a9e-5b1d-4c8e-9a3f-6d2b1e0c4a77';

describe('server/ refused operator tokens are traceable', () => {
  let t: TestApp;
  const op = (r: request.Test) => r.set('authorization', `Bearer ${t.adminToken}`);

  before(async () => {
    t = await buildTestApp();
    await t.addTenant('hosp-b');
  });
  after(async () => t.close());

  const authEvent = async (requestId: string): Promise<StoredAuditEvent | undefined> => {
    await t.deps.failureAudit.flush();
    return (await t.deps.controlPlane.audit.list({ type: 'admin.auth' })).find(
      (e) => e.detail?.requestId === requestId,
    );
  };
  const logLine = (requestId: string) =>
    t.logLines
      .map((l) => JSON.parse(l) as LogLine)
      .find((l) => l.msg === 'request refused' && l.requestId === requestId);

  const issueAndRevoke = async () => {
    const issued = await op(request(t.app).post('/admin/tokens')).send({
      role: 'auditor',
      tenant: 'hosp-b',
    });
    expect(issued.status).to.equal(201);
    const { id, token } = issued.body as { id: string; token: string };
    expect((await op(request(t.app).delete(`/admin/tokens/${id}`))).status).to.equal(204);
    return { id, token };
  };

  it('takes the Bearer scheme in any case (RFC 7235), as the hook endpoints do', async () => {
    for (const scheme of ['bearer', 'BEARER', 'Bearer']) {
      const res = await request(t.app)
        .get('/admin/tenants/hosp-b')
        .set('authorization', `${scheme} ${t.adminToken}`);
      expect(res.status, scheme).to.equal(200);
    }
    const basic = await request(t.app)
      .get('/admin/tenants/hosp-b')
      .set('authorization', `Basic ${t.adminToken}`);
    expect(basic.status).to.equal(401);
  });

  it('an unknown token: reason, request id, method and route pattern; the log line names the route', async () => {
    const res = await request(t.app)
      .get(`/admin/tenants/hosp-b/invocations/${RECORD_ID}`)
      .set('authorization', `Bearer ${UNKNOWN}`);
    expect(res.status).to.equal(401);
    const requestId = res.headers['x-request-id'] as string;
    const event = await authEvent(requestId);
    expect(event, 'admin.auth event with the request id').to.not.equal(undefined);
    expect(event?.outcome).to.equal('failure');
    expect(event?.detail).to.deep.equal({
      reason: 'unknown token',
      method: 'GET',
      endpoint: '/admin/tenants/:id/invocations/:rid',
      requestId,
    });
    expect(JSON.stringify(event)).to.not.include(RECORD_ID);
    expect(logLine(requestId)).to.include({
      status: 401,
      route: '/admin/tenants/:id/invocations/:rid',
    });
  });

  it('a path no admin route matches: /admin/* (not the raw path)', async () => {
    const res = await request(t.app)
      .post('/admin/no/such/route-x1')
      .set('authorization', `Bearer ${UNKNOWN}`);
    expect(res.status).to.equal(401);
    const event = await authEvent(res.headers['x-request-id'] as string);
    expect(event?.detail).to.include({ method: 'POST', endpoint: '/admin/*' });
    expect(JSON.stringify(event)).to.not.include('route-x1');
  });

  it('a revoked token: reason revoked with its token id; an unknown one stays unknown token', async () => {
    const { id, token } = await issueAndRevoke();
    const res = await request(t.app)
      .put('/admin/tenants/hosp-b/subscriptions')
      .set('authorization', `Bearer ${token}`)
      .send([]);
    expect(res.status).to.equal(401);
    const requestId = res.headers['x-request-id'] as string;
    const event = await authEvent(requestId);
    expect(event?.detail).to.deep.equal({
      reason: 'revoked',
      tokenId: id,
      method: 'PUT',
      endpoint: '/admin/tenants/:id/subscriptions',
      requestId,
    });
    const unknown = await request(t.app)
      .get('/admin/tenants')
      .set('authorization', `Bearer ${UNKNOWN}`);
    expect(unknown.status).to.equal(401);
    expect((await authEvent(unknown.headers['x-request-id'] as string))?.detail?.reason).to.equal(
      'unknown token',
    );
  });
});
