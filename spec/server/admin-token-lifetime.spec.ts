/**
 * Admin token lifetimes over real HTTP on the real app (SQLite control plane): who issued each
 * token (`issuedBy`), revoking a token revokes every token it issued and theirs (one
 * transaction, one audit event naming them), expiry (`expiresInDays`, default 90, 1 to 365, never
 * past the issuing token's own expiry; the bootstrap token is exempt), and a tenant-admin may
 * revoke only its tenant's auditor tokens and itself, never a peer tenant-admin.
 */
import path from 'node:path';
import { expect } from 'chai';
import { sqliteExec } from '../helpers/sqlite-exec.ts';
import request from 'supertest';
import { AdminService } from '../../server/admin-service.ts';
import { buildTestApp, type TestApp } from '../helpers/test-app.ts';

const DAY_MS = 24 * 60 * 60 * 1000;

interface Listed {
  id: string;
  role: string;
  tenant?: string;
  issuedBy?: string;
  expiresAt?: string;
  revokedAt?: string;
}

describe('admin tokens: issuer, cascade revoke, expiry, revoke rights', () => {
  let t: TestApp;
  const bearer = (token: string) => (r: request.Test) => r.set('authorization', `Bearer ${token}`);
  const op = (r: request.Test) => bearer(t.adminToken)(r);

  /** POST /admin/tokens as `token`; the 201 body. */
  async function issue(
    token: string,
    body: Record<string, unknown>,
  ): Promise<{ id: string; token: string; expiresAt: string }> {
    const res = await bearer(token)(request(t.app).post('/admin/tokens')).send(body);
    expect(res.status, JSON.stringify(res.body)).to.equal(201);
    return res.body as { id: string; token: string; expiresAt: string };
  }
  const listed = async (): Promise<Listed[]> =>
    (await op(request(t.app).get('/admin/tokens'))).body.tokens as Listed[];
  const find = async (id: string): Promise<Listed> => {
    const row = (await listed()).find((x) => x.id === id);
    expect(row, id).to.not.equal(undefined);
    return row!;
  };
  /** The status of a records read (`records:read`) as `token`. */
  const readRecords = async (token: string, tenant = 'tl-a') =>
    (await bearer(token)(request(t.app).get(`/admin/tenants/${tenant}/invocations`))).status;

  before(async () => {
    t = await buildTestApp();
    await t.addTenant('tl-a');
    await t.addTenant('tl-b');
  });
  after(async () => t.close());

  describe('cascade revoke', () => {
    it('revoking a stolen tenant-admin token revokes the auditor tokens it issued (the review repro)', async () => {
      const stolen = await issue(t.adminToken, { role: 'tenant-admin', tenant: 'tl-a' });
      const planted = await issue(stolen.token, { role: 'auditor', tenant: 'tl-a' });
      expect(await readRecords(planted.token)).to.equal(200);

      const revoked = await op(request(t.app).delete(`/admin/tokens/${stolen.id}`));
      expect(revoked.status).to.equal(204);
      expect(await readRecords(stolen.token)).to.equal(401);
      expect(await readRecords(planted.token)).to.equal(401);
      expect(await find(planted.id)).to.include({ issuedBy: stolen.id });
      expect((await find(planted.id)).revokedAt).to.be.a('string');
    });

    it('reaches grandchildren, leaves the issuer and siblings alone, and audits the cascade in one event', async () => {
      // bootstrap -> ops (operator) -> ta (tenant-admin) -> aud (auditor); ops -> other (sibling)
      const ops = await issue(t.adminToken, { role: 'platform-operator', label: 'ops' });
      const ta = await issue(ops.token, { role: 'tenant-admin', tenant: 'tl-a' });
      const aud = await issue(ta.token, { role: 'auditor', tenant: 'tl-a' });
      const ta2 = await issue(ops.token, { role: 'tenant-admin', tenant: 'tl-b' });
      const unrelated = await issue(t.adminToken, { role: 'auditor', tenant: 'tl-a' });
      expect((await find(ops.id)).issuedBy).to.equal(undefined);
      expect((await find(ta.id)).issuedBy).to.equal(ops.id);
      expect((await find(aud.id)).issuedBy).to.equal(ta.id);

      // Revoking the middle token takes its child, not its parent.
      expect((await op(request(t.app).delete(`/admin/tokens/${ta.id}`))).status).to.equal(204);
      expect(await readRecords(aud.token)).to.equal(401);
      expect(await readRecords(ta2.token, 'tl-b')).to.equal(200);
      expect((await bearer(ops.token)(request(t.app).get('/admin/tokens'))).status).to.equal(200);

      const aud2 = await issue(ta2.token, { role: 'auditor', tenant: 'tl-b' });
      expect((await op(request(t.app).delete(`/admin/tokens/${ops.id}`))).status).to.equal(204);
      for (const token of [ops.token, ta2.token, aud2.token]) {
        expect((await bearer(token)(request(t.app).get('/admin/tenants/tl-b'))).status).to.equal(
          401,
        );
      }
      expect(await readRecords(unrelated.token)).to.equal(200);

      // One event for the revoked token (counting the cascade), one per token revoked with it,
      // under that token's tenant (so the tenant's own audit trail shows it).
      const events = await t.deps.controlPlane.audit.list({ type: 'admin.token.revoke' });
      const root = events.find((e) => e.detail?.tokenId === ops.id);
      expect(root?.outcome).to.equal('success');
      expect(root?.detail).to.deep.equal({ tokenId: ops.id, cascaded: 2 });
      const cascaded = events.filter((e) => e.detail?.cascadeOf === ops.id);
      // ta (and so aud) were revoked before: only the still-live descendants are revoked now.
      expect(cascaded.map((e) => e.detail?.tokenId).sort()).to.deep.equal([ta2.id, aud2.id].sort());
      expect(cascaded.map((e) => e.tenant)).to.deep.equal(['tl-b', 'tl-b']);
      expect(cascaded.find((e) => e.detail?.tokenId === aud2.id)?.detail?.issuedBy).to.equal(
        ta2.id,
      );
      const first = events.find((e) => e.detail?.tokenId === ta.id && !e.detail.cascadeOf);
      expect(first?.detail?.cascaded).to.equal(1);
    });

    it('refuses to issue with a token revoked meanwhile (no live child of a revoked token)', async () => {
      const ta = await issue(t.adminToken, { role: 'tenant-admin', tenant: 'tl-a' });
      // Authenticated, then revoked before its issue commits: the issue transaction re-reads
      // the issuer. Reproduced through the service with the principal resolved beforehand.
      const principal = await t.deps.controlPlane.adminTokens.authenticate(ta.token);
      expect(principal).to.not.equal(undefined);
      expect((await op(request(t.app).delete(`/admin/tokens/${ta.id}`))).status).to.equal(204);
      const admin = new AdminService({
        controlPlane: t.deps.controlPlane,
        evaluator: t.deps.evaluator,
      });
      let refused: unknown;
      try {
        await admin.issueToken(principal!, { role: 'auditor', tenant: 'tl-a' });
      } catch (err) {
        refused = err;
      }
      expect(refused).to.be.instanceOf(Error);
      expect((refused as Error).name).to.equal('AdminAuthError');
      expect((await listed()).filter((x) => x.issuedBy === ta.id)).to.deep.equal([]);
    });
  });

  describe('expiry', () => {
    it('sets expiresAt 90 days out by default, shows it in the list, and exempts nobody issued', async () => {
      const before = Date.now();
      const tok = await issue(t.adminToken, { role: 'rule-author' });
      const at = Date.parse(tok.expiresAt);
      expect(at - before).to.be.within(90 * DAY_MS - 5000, 90 * DAY_MS + 5000);
      expect((await find(tok.id)).expiresAt).to.equal(tok.expiresAt);
    });

    it('takes expiresInDays from 1 to 365 (whole days); anything else is a 400 naming the field', async () => {
      const before = Date.now();
      const year = await issue(t.adminToken, { role: 'rule-author', expiresInDays: 365 });
      expect(Date.parse(year.expiresAt) - before).to.be.within(
        365 * DAY_MS - 5000,
        365 * DAY_MS + 5000,
      );
      const day = await issue(t.adminToken, { role: 'rule-author', expiresInDays: 1 });
      expect(Date.parse(day.expiresAt) - before).to.be.within(DAY_MS - 5000, DAY_MS + 5000);
      for (const bad of [0, -1, 366, 1.5, '30', null, 1e9]) {
        const res = await op(request(t.app).post('/admin/tokens')).send({
          role: 'rule-author',
          expiresInDays: bad,
        });
        expect(res.status, String(bad)).to.equal(400);
        expect(res.body.field, String(bad)).to.equal('expiresInDays');
      }
    });

    it('refuses a token whose expiresAt has passed (401), the same token a moment before works', async () => {
      const tok = await issue(t.adminToken, { role: 'tenant-admin', tenant: 'tl-a' });
      expect(await readRecords(tok.token)).to.equal(200);
      await sqliteExec(path.join(t.dataDir, 'control.sqlite'), [
        [
          'UPDATE admin_tokens SET expires_at = ? WHERE id = ?',
          ['2020-01-01T00:00:00.000Z', tok.id],
        ],
      ]);
      expect(await readRecords(tok.token)).to.equal(401);
      const res = await bearer(tok.token)(request(t.app).get('/admin/tenants/tl-a'));
      expect(res.status).to.equal(401);
      expect(res.body.error).to.equal('invalid_token');
    });

    it('never lets a child outlive the token that issued it', async () => {
      const ta = await issue(t.adminToken, {
        role: 'tenant-admin',
        tenant: 'tl-a',
        expiresInDays: 7,
      });
      const aud = await issue(ta.token, { role: 'auditor', tenant: 'tl-a', expiresInDays: 300 });
      expect(aud.expiresAt).to.equal(ta.expiresAt);
      const shorter = await issue(ta.token, { role: 'auditor', tenant: 'tl-a', expiresInDays: 2 });
      expect(Date.parse(shorter.expiresAt)).to.be.below(Date.parse(ta.expiresAt));
    });

    it('keeps the bootstrap token working (it has no row, no expiry)', async () => {
      expect((await op(request(t.app).get('/admin/tokens'))).status).to.equal(200);
    });
  });

  describe('what a tenant-admin may revoke', () => {
    it('its tenant auditor tokens and itself, never a peer tenant-admin nor another tenant', async () => {
      const ta1 = await issue(t.adminToken, { role: 'tenant-admin', tenant: 'tl-a', label: 'ta1' });
      const ta2 = await issue(t.adminToken, { role: 'tenant-admin', tenant: 'tl-a', label: 'ta2' });
      const audByOp = await issue(t.adminToken, { role: 'auditor', tenant: 'tl-a' });
      const audB = await issue(t.adminToken, { role: 'auditor', tenant: 'tl-b' });
      const as1 = bearer(ta1.token);

      const peer = await as1(request(t.app).delete(`/admin/tokens/${ta2.id}`));
      expect(peer.status).to.equal(403);
      expect(peer.body.error).to.equal('forbidden');
      expect(await readRecords(ta2.token)).to.equal(200);
      expect((await find(ta2.id)).revokedAt).to.equal(undefined);

      // Another tenant's token answers like an unknown one: its id is not confirmed.
      const other = await as1(request(t.app).delete(`/admin/tokens/${audB.id}`));
      expect(other.status).to.equal(404);
      expect(other.body.error).to.equal('not_found');
      expect(await readRecords(audB.token, 'tl-b')).to.equal(200);
      // An auditor of its tenant, even one the operator issued.
      expect((await as1(request(t.app).delete(`/admin/tokens/${audByOp.id}`))).status).to.equal(
        204,
      );
      expect(await readRecords(audByOp.token)).to.equal(401);
      // Itself (a tenant-admin that suspects its token leaked need not wait for the operator).
      expect((await as1(request(t.app).delete(`/admin/tokens/${ta1.id}`))).status).to.equal(204);
      expect(await readRecords(ta1.token)).to.equal(401);
      // The operator still revokes any token.
      expect((await op(request(t.app).delete(`/admin/tokens/${ta2.id}`))).status).to.equal(204);
    });

    it('an auditor revokes nothing, itself included', async () => {
      const aud = await issue(t.adminToken, { role: 'auditor', tenant: 'tl-a' });
      expect(
        (await bearer(aud.token)(request(t.app).delete(`/admin/tokens/${aud.id}`))).status,
      ).to.equal(403);
    });
  });
});
