/**
 * Rolling a pack out through the admin API, one tenant's subscription at a time:
 * `PUT /admin/tenants/{id}/subscriptions/{pack}` sets that pack's pinned version and canary
 * (the tenant's other packs untouched, atomically), `DELETE` drops it, and
 * `GET /admin/rule-packs/{id}/subscriptions` lists who is on which version. A rule author
 * (DESIGN.md: "writes, tests, uploads, versions, rolls out rule packs") moves the versions of a
 * pack a tenant already has; adding or dropping a pack stays the tenant-admin's or the
 * operator's. Real HTTP, real control plane, every change audited.
 */
import { expect } from 'chai';
import request from 'supertest';
import { tinyPack } from '../helpers/packs.ts';
import { buildTestApp, type TestApp } from '../helpers/test-app.ts';

interface Sub {
  pack: string;
  version: string;
  canary?: { version: string; percent: number };
}

describe('server/ pack rollout, one subscription at a time', function () {
  this.timeout(60_000);
  let t: TestApp;
  let author: string;
  let authorId: string;
  let adminA: string;
  let adminB: string;
  let auditorA: string;
  const op = (r: request.Test) => r.set('authorization', `Bearer ${t.adminToken}`);
  const as = (token: string) => (r: request.Test) => r.set('authorization', `Bearer ${token}`);
  const subsOf = async (tenant: string): Promise<Sub[]> =>
    (await op(request(t.app).get(`/admin/tenants/${tenant}`))).body.subscriptions as Sub[];
  const put = (token: string, tenant: string, pack: string, body: unknown) =>
    as(token)(request(t.app).put(`/admin/tenants/${tenant}/subscriptions/${pack}`)).send(
      body as object,
    );
  const del = (token: string, tenant: string, pack: string) =>
    as(token)(request(t.app).delete(`/admin/tenants/${tenant}/subscriptions/${pack}`));

  before(async () => {
    t = await buildTestApp();
    for (const [id, version] of [
      ['alpha', '1.0.0'],
      ['alpha', '1.1.0'],
      ['beta', '1.0.0'],
      ['gamma', '1.0.0'],
    ] as const) {
      expect((await t.uploadPack(tinyPack(id, version))).status).to.equal(201);
    }
    // alpha 2.0.0 reads another prefetch key: it cannot be 1.x's canary.
    const other = tinyPack('alpha', '2.0.0');
    (other.services as Array<{ prefetch?: Record<string, string> }>)[0]!.prefetch = {
      meds: 'MedicationRequest?patient={{context.patientId}}',
    };
    expect((await t.uploadPack(other)).status).to.equal(201);
    await t.addTenant('hosp-a', { subscriptions: [{ pack: 'alpha', version: '1.0.0' }] });
    await t.addTenant('hosp-b', { subscriptions: [{ pack: 'beta', version: '1.0.0' }] });
    const issue = async (body: object) => {
      const res = await op(request(t.app).post('/admin/tokens')).send(body);
      expect(res.status).to.equal(201);
      return res.body as { id: string; token: string };
    };
    const a = await issue({ role: 'rule-author' });
    author = a.token;
    authorId = a.id;
    adminA = (await issue({ role: 'tenant-admin', tenant: 'hosp-a' })).token;
    adminB = (await issue({ role: 'tenant-admin', tenant: 'hosp-b' })).token;
    auditorA = (await issue({ role: 'auditor', tenant: 'hosp-a' })).token;
  });
  after(async () => t.close());

  it("lists a pack's subscribers to a rule author: tenant, version, canary", async () => {
    const res = await as(author)(request(t.app).get('/admin/rule-packs/alpha/subscriptions'));
    expect(res.status, JSON.stringify(res.body)).to.equal(200);
    expect(res.body).to.deep.equal({ subscriptions: [{ tenant: 'hosp-a', version: '1.0.0' }] });
    const none = await as(author)(request(t.app).get('/admin/rule-packs/gamma/subscriptions'));
    expect(none.body).to.deep.equal({ subscriptions: [] });
    expect(
      (await as(author)(request(t.app).get('/admin/rule-packs/nope/subscriptions'))).status,
    ).to.equal(404);
    // Tenant-scoped roles never see who else subscribes (other tenants' ids and versions).
    for (const token of [auditorA, adminA]) {
      expect(
        (await as(token)(request(t.app).get('/admin/rule-packs/alpha/subscriptions'))).status,
      ).to.equal(403);
    }
  });

  it('lets a rule author move a subscribed pack to a canary, then promote it, audited', async () => {
    const canary = await put(author, 'hosp-a', 'alpha', {
      version: '1.0.0',
      canary: { version: '1.1.0', percent: 10 },
    });
    expect(canary.status, JSON.stringify(canary.body)).to.equal(200);
    expect(canary.body).to.deep.equal({
      tenant: 'hosp-a',
      subscription: { pack: 'alpha', version: '1.0.0', canary: { version: '1.1.0', percent: 10 } },
    });
    expect(await subsOf('hosp-a')).to.deep.equal([
      { pack: 'alpha', version: '1.0.0', canary: { version: '1.1.0', percent: 10 } },
    ]);
    const promoted = await put(author, 'hosp-a', 'alpha', { version: '1.1.0' });
    expect(promoted.status).to.equal(200);
    expect(await subsOf('hosp-a')).to.deep.equal([{ pack: 'alpha', version: '1.1.0' }]);
    const events = await t.deps.controlPlane.audit.list({
      type: 'admin.tenant.subscriptions',
      tenant: 'hosp-a',
    });
    const mine = events.filter((e) => e.actor === `rule-author:${authorId}`);
    expect(mine.map((e) => e.detail?.subscriptions)).to.deep.equal([
      'alpha@1.0.0+canary:1.1.0:10%',
      'alpha@1.1.0',
    ]);
    expect(mine.every((e) => e.detail?.pack === 'alpha')).to.equal(true);
  });

  it('refuses a rule author adding a pack to a tenant, or dropping one (403, nothing changed)', async () => {
    const add = await put(author, 'hosp-b', 'alpha', { version: '1.0.0' });
    expect(add.status, JSON.stringify(add.body)).to.equal(403);
    expect(add.body.message).to.include('hosp-b');
    expect(await subsOf('hosp-b')).to.deep.equal([{ pack: 'beta', version: '1.0.0' }]);
    expect((await del(author, 'hosp-b', 'beta')).status).to.equal(403);
    expect(await subsOf('hosp-b')).to.deep.equal([{ pack: 'beta', version: '1.0.0' }]);
    await t.deps.failureAudit.flush();
    const refused = await t.deps.controlPlane.audit.list({ type: 'admin.forbidden' });
    expect(
      refused.some(
        (e) =>
          e.actor === `rule-author:${authorId}` &&
          e.tenant === 'hosp-b' &&
          e.detail?.reason === 'pack:rollout',
      ),
    ).to.equal(true);
  });

  it('hides which tenant ids exist from a rule author: an unknown tenant is refused like one without the pack', async () => {
    const unknown = await put(author, 'no-such-hosp', 'alpha', { version: '1.1.0' });
    const without = await put(author, 'hosp-b', 'alpha', { version: '1.1.0' });
    expect([unknown.status, without.status]).to.deep.equal([403, 403]);
    expect(unknown.body.message).to.equal(without.body.message.replace('hosp-b', 'no-such-hosp'));
  });

  it("audits a rule author's refused DELETE as the action it lacks (tenant:subscriptions)", async () => {
    const res = await del(author, 'hosp-b', 'beta');
    expect(res.status).to.equal(403);
    await t.deps.failureAudit.flush();
    const refused = await t.deps.controlPlane.audit.list({ type: 'admin.forbidden' });
    const event = refused.find((e) => e.detail?.requestId === res.headers['x-request-id']);
    expect(event?.detail?.reason).to.equal('tenant:subscriptions');
  });

  it('with existingOnly, never gives a tenant a pack it does not have, whoever asks (409)', async () => {
    const res = await op(
      request(t.app).put('/admin/tenants/hosp-b/subscriptions/alpha?existingOnly=true'),
    ).send({
      version: '1.0.0',
    });
    expect(res.status, JSON.stringify(res.body)).to.equal(409);
    expect(await subsOf('hosp-b')).to.deep.equal([{ pack: 'beta', version: '1.0.0' }]);
    const bad = await op(
      request(t.app).put('/admin/tenants/hosp-b/subscriptions/beta?existingOnly=yes'),
    ).send({
      version: '1.0.0',
    });
    expect(bad.status).to.equal(400);
    expect(bad.body.field).to.equal('existingOnly');
  });

  it('names the field of a bad entry (400), a canary that cannot stand in (422), an unknown tenant (404)', async () => {
    const missing = await put(author, 'hosp-a', 'alpha', { version: '9.9.9' });
    expect(missing.status).to.equal(400);
    expect(missing.body.field).to.equal('version');
    const bad = await put(author, 'hosp-a', 'alpha', {
      version: '1.1.0',
      canary: { version: '1.0.0', percent: 101 },
    });
    expect(bad.status).to.equal(400);
    expect(bad.body.field).to.equal('canary.percent');
    const extra = await put(author, 'hosp-a', 'alpha', { version: '1.1.0', pack: 'beta' });
    expect(extra.status).to.equal(400);
    const mismatch = await put(author, 'hosp-a', 'alpha', {
      version: '1.1.0',
      canary: { version: '2.0.0', percent: 5 },
    });
    expect(mismatch.status, JSON.stringify(mismatch.body)).to.equal(422);
    expect(mismatch.body.message).to.match(
      /^canary\.version: service 'alpha-order-sign' of alpha@2\.0\.0 /,
    );
    expect(mismatch.body.message).to.include("another template for prefetch 'meds'");
    expect((await put(t.adminToken, 'no-such', 'alpha', { version: '1.1.0' })).status).to.equal(
      404,
    );
    expect(await subsOf('hosp-a')).to.deep.equal([{ pack: 'alpha', version: '1.1.0' }]);
  });

  it("lets a tenant-admin add and drop its own tenant's packs, never another tenant's", async () => {
    expect((await put(adminA, 'hosp-a', 'beta', { version: '1.0.0' })).status).to.equal(200);
    expect(await subsOf('hosp-a')).to.deep.equal([
      { pack: 'alpha', version: '1.1.0' },
      { pack: 'beta', version: '1.0.0' },
    ]);
    const dropped = await del(adminA, 'hosp-a', 'beta');
    expect(dropped.status, JSON.stringify(dropped.body)).to.equal(200);
    expect(dropped.body).to.deep.equal({ tenant: 'hosp-a', removed: 'beta' });
    expect(await subsOf('hosp-a')).to.deep.equal([{ pack: 'alpha', version: '1.1.0' }]);
    const again = await del(adminA, 'hosp-a', 'beta');
    expect(again.status).to.equal(404);
    expect(again.body.message).to.include('subscription');
    expect((await put(adminB, 'hosp-a', 'beta', { version: '1.0.0' })).status).to.equal(403);
    expect((await del(adminB, 'hosp-a', 'alpha')).status).to.equal(403);
    expect((await put(auditorA, 'hosp-a', 'beta', { version: '1.0.0' })).status).to.equal(403);
    expect(await subsOf('hosp-a')).to.deep.equal([{ pack: 'alpha', version: '1.1.0' }]);
  });

  it('keeps every change when several packs are set at once (no lost update)', async () => {
    const results = await Promise.all(
      ['beta', 'gamma'].map((pack) => put(adminA, 'hosp-a', pack, { version: '1.0.0' })),
    );
    expect(results.map((r) => r.status)).to.deep.equal([200, 200]);
    expect((await subsOf('hosp-a')).map((s) => s.pack).sort()).to.deep.equal([
      'alpha',
      'beta',
      'gamma',
    ]);
  });
});
