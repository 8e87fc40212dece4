/**
 * A refused admin token is audited with why (`admin.auth` failure): `expired` for a token past
 * its `expiresAt`, `revoked` for a revoked one (both naming the token id), `unknown token` for a
 * token the control plane never issued. The caller sees the same 401 whatever the reason.
 */
import path from 'node:path';
import { expect } from 'chai';
import { sqliteExec } from '../helpers/sqlite-exec.ts';
import request from 'supertest';
import { buildTestApp, type TestApp } from '../helpers/test-app.ts';

describe('admin tokens: a refusal is audited with its reason (expired, revoked, unknown)', () => {
  let t: TestApp;
  const op = (r: request.Test) => r.set('authorization', `Bearer ${t.adminToken}`);

  before(async () => {
    t = await buildTestApp();
    await t.addTenant('exp-a');
  });
  after(async () => t.close());

  /** GET /admin/tenants/exp-a as `token`; then the last `admin.auth` event. */
  async function refused(token: string) {
    const res = await request(t.app)
      .get('/admin/tenants/exp-a')
      .set('authorization', `Bearer ${token}`);
    await t.deps.failureAudit.flush();
    const events = await t.deps.controlPlane.audit.list({ type: 'admin.auth' });
    return { res, event: events.at(-1) };
  }

  it('audits an expired token as expired, a revoked one as revoked, an unknown one as unknown', async () => {
    const issue = async () =>
      (await op(request(t.app).post('/admin/tokens')).send({ role: 'auditor', tenant: 'exp-a' }))
        .body as { id: string; token: string };
    const expired = await issue();
    const revoked = await issue();
    await sqliteExec(path.join(t.dataDir, 'control.sqlite'), [
      [
        'UPDATE admin_tokens SET expires_at = ? WHERE id = ?',
        ['2020-01-01T00:00:00.000Z', expired.id],
      ],
    ]);
    expect((await op(request(t.app).delete(`/admin/tokens/${revoked.id}`))).status).to.equal(204);

    const e = await refused(expired.token);
    expect(e.res.status).to.equal(401);
    expect(e.event?.outcome).to.equal('failure');
    expect(e.event?.detail).to.include({ reason: 'expired', tokenId: expired.id });

    const r = await refused(revoked.token);
    expect(r.res.status).to.equal(401);
    expect(r.event?.detail).to.include({ reason: 'revoked', tokenId: revoked.id });

    const u = await refused(`ccds_${'A'.repeat(43)}`);
    expect(u.res.status).to.equal(401);
    expect(u.event?.detail?.reason).to.equal('unknown token');
    expect(u.event?.detail).to.not.have.property('tokenId');
    // The caller learns nothing of the reason.
    expect(e.res.body).to.deep.equal(u.res.body);
    expect(r.res.body).to.deep.equal(u.res.body);
  });
});
