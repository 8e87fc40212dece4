/**
 * `lastUsedAt` of admin tokens over real HTTP on the real app (SQLite control plane): a request
 * a token authenticates records its time, `GET /admin/tokens` lists it (absent: no use
 * recorded), a refused token records nothing, `?unusedForDays=N` lists the stale live tokens,
 * and a failing write never fails the request (a warning names the token's id, never the token).
 */
import path from 'node:path';
import { expect } from 'chai';
import request from 'supertest';
import { controlPlaneWritesDone } from '../helpers/control-plane-writes.ts';
import { sqliteExec } from '../helpers/sqlite-exec.ts';
import { buildTestApp, type TestApp } from '../helpers/test-app.ts';

const DAY_MS = 24 * 60 * 60 * 1000;

interface Listed {
  id: string;
  role: string;
  tenant?: string;
  createdAt: string;
  revokedAt?: string;
  lastUsedAt?: string;
}

describe('admin tokens: lastUsedAt over the admin API', () => {
  let t: TestApp;
  const bearer = (token: string) => (r: request.Test) => r.set('authorization', `Bearer ${token}`);
  const op = (r: request.Test) => bearer(t.adminToken)(r);
  const controlFile = () => path.join(t.dataDir, 'control.sqlite');

  async function issue(body: Record<string, unknown>): Promise<{ id: string; token: string }> {
    const res = await op(request(t.app).post('/admin/tokens')).send(body);
    expect(res.status, JSON.stringify(res.body)).to.equal(201);
    return res.body as { id: string; token: string };
  }
  /** GET /admin/tokens (as `token`, default the operator) once the background writes ended. */
  async function listed(query = '', token = t.adminToken): Promise<Listed[]> {
    await controlPlaneWritesDone(t.deps.controlPlane);
    const res = await bearer(token)(request(t.app).get(`/admin/tokens${query}`));
    expect(res.status, JSON.stringify(res.body)).to.equal(200);
    return res.body.tokens as Listed[];
  }
  const find = async (id: string): Promise<Listed> => {
    const row = (await listed()).find((x) => x.id === id);
    expect(row, id).to.not.equal(undefined);
    return row!;
  };

  beforeEach(async () => {
    t = await buildTestApp();
    await t.addTenant('lu-a');
    await t.addTenant('lu-b');
  });
  afterEach(async () => {
    await controlPlaneWritesDone(t.deps.controlPlane);
    await t.close();
  });

  it('records the time of a request the token authenticated, and lists it', async () => {
    const used = await issue({ role: 'platform-operator', label: 'nightly script' });
    const idle = await issue({ role: 'rule-author', label: 'left over' });
    const before = new Date().toISOString();
    expect((await bearer(used.token)(request(t.app).get('/admin/tenants'))).status).to.equal(200);
    const after = new Date().toISOString();
    const row = await find(used.id);
    expect(row.lastUsedAt).to.be.a('string');
    expect(row.lastUsedAt! >= before && row.lastUsedAt! <= after, row.lastUsedAt).to.equal(true);
    // Never used: no lastUsedAt.
    expect(await find(idle.id)).to.not.have.property('lastUsedAt');
  });

  it('a refused token records nothing (revoked; and an unknown one changes no row)', async () => {
    const tok = await issue({ role: 'rule-author' });
    expect((await op(request(t.app).delete(`/admin/tokens/${tok.id}`))).status).to.equal(204);
    expect((await bearer(tok.token)(request(t.app).get('/admin/rule-packs'))).status).to.equal(401);
    const bogus = `ccds_${'A'.repeat(43)}`;
    expect((await bearer(bogus)(request(t.app).get('/admin/rule-packs'))).status).to.equal(401);
    for (const row of await listed()) {
      expect(row, row.id).to.not.have.property('lastUsedAt');
    }
  });

  it('?unusedForDays=N lists the live tokens neither used nor issued in the last N days', async () => {
    const stale = await issue({ role: 'platform-operator', label: 'used 40 days ago' });
    const neverUsed = await issue({ role: 'rule-author', label: 'issued 40 days ago' });
    const fresh = await issue({ role: 'rule-author', label: 'used now' });
    const recent = await issue({ role: 'rule-author', label: 'issued now, unused' });
    const revoked = await issue({ role: 'rule-author', label: 'revoked' });
    const auditorA = await issue({ role: 'auditor', tenant: 'lu-a' });
    const auditorB = await issue({ role: 'auditor', tenant: 'lu-b' });
    const tenantAdmin = await issue({ role: 'tenant-admin', tenant: 'lu-a' });
    expect((await bearer(fresh.token)(request(t.app).get('/admin/rule-packs'))).status).to.equal(
      200,
    );
    expect((await op(request(t.app).delete(`/admin/tokens/${revoked.id}`))).status).to.equal(204);
    await controlPlaneWritesDone(t.deps.controlPlane);
    const ago = new Date(Date.now() - 40 * DAY_MS).toISOString();
    // What 40 days of the service would have left (the app's clock is the real one).
    await sqliteExec(controlFile(), [
      [`UPDATE admin_tokens SET last_used_at = ? WHERE id = ?`, [ago, stale.id]],
      [
        `UPDATE admin_tokens SET created_at = ? WHERE id IN (?, ?, ?, ?)`,
        [ago, neverUsed.id, revoked.id, auditorA.id, auditorB.id],
      ],
    ]);
    const ids = (rows: Listed[]) => rows.map((r) => r.id).sort();
    expect(ids(await listed('?unusedForDays=30'))).to.deep.equal(
      [stale.id, neverUsed.id, auditorA.id, auditorB.id].sort(),
    );
    expect(ids(await listed('?unusedForDays=50'))).to.deep.equal([]);
    // A tenant-admin sees its own tenant's only (and its own use just now is recorded).
    expect(ids(await listed('?unusedForDays=30', tenantAdmin.token))).to.deep.equal([auditorA.id]);
    expect((await find(tenantAdmin.id)).lastUsedAt).to.be.a('string');
    expect(ids(await listed())).to.include.members([fresh.id, recent.id, revoked.id]);
    for (const bad of ['0', '-1', '1.5', 'x', '3651', '']) {
      const res = await op(request(t.app).get(`/admin/tokens?unusedForDays=${bad}`));
      expect(res.status, bad).to.equal(400);
      expect(res.body, bad).to.include({ error: 'invalid_request', field: 'unusedForDays' });
    }
    const twice = await op(request(t.app).get('/admin/tokens?unusedForDays=1&unusedForDays=2'));
    expect(twice.status).to.equal(400);
  });

  it('a failing write fails no request: a warn line names the token id, never the token', async () => {
    const tok = await issue({ role: 'platform-operator' });
    // The control plane refuses the write (as a full disk or a lost connection would).
    await sqliteExec(controlFile(), [
      `CREATE TRIGGER spec_no_last_used BEFORE UPDATE OF last_used_at ON admin_tokens
       BEGIN SELECT RAISE(ABORT, 'spec: write refused'); END`,
    ]);
    const before = t.logLines.length;
    const res = await bearer(tok.token)(request(t.app).get('/admin/tenants'));
    expect(res.status).to.equal(200);
    await controlPlaneWritesDone(t.deps.controlPlane);
    await new Promise((resolve) => setImmediate(resolve));
    // The server's logger says it (a CLI process without one gets a process warning).
    const ours = t.logLines
      .slice(before)
      .map((l) => JSON.parse(l) as Record<string, unknown>)
      .filter((l) => l.msg === 'admin token: last use not recorded');
    expect(ours).to.have.length(1);
    expect(ours[0]).to.include({ level: 'warn', tokenId: tok.id });
    // The driver's error, as the logger serialises errors (Sequelize names it by its class).
    expect((ours[0]?.err as { message?: string }).message).to.be.a('string');
    expect(t.logLines.slice(before).join('\n')).to.not.include(tok.token);
    expect(await find(tok.id)).to.not.have.property('lastUsedAt');
    // The token keeps working meanwhile.
    expect((await bearer(tok.token)(request(t.app).get('/admin/tenants'))).status).to.equal(200);
  });
});
