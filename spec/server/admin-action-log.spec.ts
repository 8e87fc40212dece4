import { expect } from 'chai';
import request from 'supertest';
import { buildTestApp, type TestApp } from '../helpers/test-app.ts';
import { tinyPack } from '../helpers/packs.ts';
import { TestIssuer } from '../helpers/test-issuer.ts';

interface ActionLine {
  level: string;
  msg: string;
  requestId?: string;
  action?: string;
  tenant?: string;
  principal?: string;
  role?: string;
  outcome?: string;
  status?: number;
  job?: string;
  [key: string]: unknown;
}

/**
 * Every state-changing admin API call logs one `admin action` line (info) for on-call
 * correlation: the action, the tenant, the principal's token id (never the token), the outcome
 * (`success`, `refused` for a 4xx, `failed` for a 5xx) and the request id. Real app, real
 * admin API, the captured log.
 */
describe('admin API: one log line per admin action', function () {
  this.timeout(60_000);
  let t: TestApp;
  const op = (r: request.Test) => r.set('authorization', `Bearer ${t.adminToken}`);
  const actions = (): ActionLine[] =>
    t.logLines.map((l) => JSON.parse(l) as ActionLine).filter((l) => l.msg === 'admin action');
  /** The action lines of one response (by its X-Request-Id). */
  const linesOf = (res: request.Response): ActionLine[] =>
    actions().filter((l) => l.requestId === res.headers['x-request-id']);

  before(async () => {
    t = await buildTestApp();
    await t.addTenant('act-base');
  });
  after(async () => t.close());

  it('logs a created, updated, suspended, resumed and subscribed tenant, one info line each', async () => {
    expect((await t.uploadPack(tinyPack('act-pack'))).status).to.equal(201);
    const issuer = await TestIssuer.create({ iss: 'https://ehr-act-a.test.example' });
    const steps: Array<[string, () => request.Test, number, Record<string, unknown>]> = [
      [
        'admin.tenant.create',
        () =>
          op(request(t.app).post('/admin/tenants')).send({
            id: 'act-a',
            name: 'Tenant act-a',
            region: 'local',
            issuers: [{ iss: issuer.iss, jwks: issuer.publicJwks() }],
          }),
        201,
        {},
      ],
      [
        'admin.tenant.update',
        () => op(request(t.app).patch('/admin/tenants/act-a')).send({ name: 'Renamed' }),
        200,
        {},
      ],
      [
        'admin.tenant.suspend',
        () => op(request(t.app).post('/admin/tenants/act-a/suspend')),
        200,
        {},
      ],
      [
        'admin.tenant.resume',
        () => op(request(t.app).post('/admin/tenants/act-a/resume')),
        200,
        {},
      ],
      [
        'admin.tenant.subscriptions',
        () =>
          op(request(t.app).put('/admin/tenants/act-a/subscriptions')).send([
            { pack: 'act-pack', version: '1.0.0' },
          ]),
        200,
        {},
      ],
    ];
    for (const [action, call, status] of steps) {
      const res = await call();
      expect(res.status, action).to.equal(status);
      const lines = linesOf(res);
      expect(lines, action).to.have.length(1);
      expect(lines[0], action).to.include({
        level: 'info',
        action,
        tenant: 'act-a',
        principal: 'bootstrap',
        role: 'platform-operator',
        outcome: 'success',
        status,
      });
    }
  });

  it('logs a pack upload, a token issued and revoked, and a key rotation with its job id; never a token', async () => {
    const up = await t.uploadPack(tinyPack('act-pack-2'));
    expect(up.status).to.equal(201);
    expect(linesOf(up)[0]).to.include({
      action: 'admin.pack.upload',
      outcome: 'success',
      pack: 'act-pack-2',
      version: '1.0.0',
    });

    const issued = await op(request(t.app).post('/admin/tokens')).send({
      role: 'tenant-admin',
      tenant: 'act-base',
    });
    expect(issued.status).to.equal(201);
    const token = issued.body.token as string;
    const tokenId = issued.body.id as string;
    expect(linesOf(issued)).to.have.length(1);
    expect(linesOf(issued)[0]).to.include({
      action: 'admin.token.issue',
      tenant: 'act-base',
      principal: 'bootstrap',
      outcome: 'success',
      tokenId,
    });

    // An issued operator token: its id is the principal.
    const operator = (
      await op(request(t.app).post('/admin/tokens')).send({ role: 'platform-operator' })
    ).body as { id: string; token: string };
    const rot = await request(t.app)
      .post('/admin/tenants/act-base/keys/rotate')
      .set('authorization', `Bearer ${operator.token}`)
      .send({});
    expect(rot.status).to.equal(202);
    expect(linesOf(rot)[0]).to.include({
      action: 'key.rotate',
      tenant: 'act-base',
      principal: operator.id,
      role: 'platform-operator',
      outcome: 'success',
      job: rot.body.id as string,
    });
    await t.deps.stores.waitForJob(rot.body.id as string);

    const revoked = await op(request(t.app).delete(`/admin/tokens/${tokenId}`));
    expect(revoked.status).to.equal(204);
    expect(linesOf(revoked)[0]).to.include({
      action: 'admin.token.revoke',
      tenant: 'act-base',
      outcome: 'success',
      tokenId,
    });

    for (const line of t.logLines) {
      expect(line).not.to.include(token);
      expect(line).not.to.include(operator.token);
      expect(line).not.to.include(t.adminToken);
    }
  });

  it('logs a refused action (403, 400, malformed JSON, 404) as refused, with the status', async () => {
    const author = (
      await op(request(t.app).post('/admin/tokens')).send({ role: 'rule-author', label: 'x' })
    ).body as { id: string; token: string };
    const forbidden = await request(t.app)
      .post('/admin/tenants/act-base/suspend')
      .set('authorization', `Bearer ${author.token}`);
    expect(forbidden.status).to.equal(403);
    expect(linesOf(forbidden)).to.have.length(1);
    expect(linesOf(forbidden)[0]).to.include({
      level: 'info',
      action: 'admin.tenant.suspend',
      tenant: 'act-base',
      principal: author.id,
      role: 'rule-author',
      outcome: 'refused',
      status: 403,
    });

    const badRole = await op(request(t.app).post('/admin/tokens')).send({ role: 'wizard' });
    expect(badRole.status).to.equal(400);
    expect(linesOf(badRole)[0]).to.include({
      action: 'admin.token.issue',
      outcome: 'refused',
      status: 400,
    });

    const malformed = await op(request(t.app).post('/admin/tenants'))
      .set('content-type', 'application/json')
      .send('{"id": "act-b",');
    expect(malformed.status).to.equal(400);
    expect(linesOf(malformed)[0]).to.include({
      action: 'admin.tenant.create',
      outcome: 'refused',
      status: 400,
    });

    const missing = await op(request(t.app).post('/admin/tenants/no-such-tenant/suspend'));
    expect(missing.status).to.equal(404);
    expect(linesOf(missing)[0]).to.include({
      action: 'admin.tenant.suspend',
      tenant: 'no-such-tenant',
      outcome: 'refused',
      status: 404,
    });
  });

  it('names no tenant an operator made up that is not a tenant id, and logs no line for reads', async () => {
    const odd = await op(request(t.app).post('/admin/tenants/Jane%20Doe%201937/suspend'));
    expect(odd.status).to.be.within(400, 499);
    const [line] = linesOf(odd);
    expect(line).to.include({ action: 'admin.tenant.suspend', outcome: 'refused' });
    expect(line).not.to.have.property('tenant');
    for (const l of t.logLines) {
      expect(l).not.to.include('Jane');
    }

    const reads = [
      await op(request(t.app).get('/admin/tenants')),
      await op(request(t.app).get('/admin/tenants/act-base')),
      await op(request(t.app).get('/admin/rule-packs')),
      await op(request(t.app).get('/admin/tenants/act-base/keys')),
    ];
    for (const res of reads) {
      expect(res.status).to.equal(200);
      expect(linesOf(res)).to.deep.equal([]);
    }
  });

  it('logs a backup and a deprovision (crypto-shred) of the tenant', async () => {
    await t.addTenant('act-gone');
    await t.deps.stores.provisionTenant('act-gone');
    const backup = await op(request(t.app).post('/admin/tenants/act-gone/backups'));
    expect(backup.status, JSON.stringify(backup.body)).to.equal(201);
    expect(linesOf(backup)[0]).to.include({
      action: 'backup.create',
      tenant: 'act-gone',
      outcome: 'success',
    });
    const gone = await op(request(t.app).delete('/admin/tenants/act-gone'));
    expect(gone.status).to.equal(200);
    expect(linesOf(gone)[0]).to.include({
      action: 'tenant.deprovision',
      tenant: 'act-gone',
      outcome: 'success',
    });
  });
});
