import { expect } from 'chai';
import request from 'supertest';
import { buildTestApp, type TestApp } from '../helpers/test-app.ts';

/**
 * A read never creates a tenant's store. A tenant registered in this region but never called
 * has no store yet; an auditor's GET of its audit head or verification, its record list, a
 * record, or its override rates used to create one (a new DEK and its `key.create` event) as a
 * side effect of reading. Each read now answers as the empty store would, and leaves none.
 */
describe('admin reads of a tenant that has no store yet create none', function () {
  this.timeout(60_000);
  let t: TestApp;
  let auditor: string;
  const as = (token: string) => (r: request.Test) => r.set('authorization', `Bearer ${token}`);

  before(async () => {
    t = await buildTestApp({ CELLCDS_SEED_DEMO: 'false' });
    await t.addTenant('quiet');
    auditor = (
      await as(t.adminToken)(request(t.app).post('/admin/tokens')).send({
        role: 'auditor',
        tenant: 'quiet',
      })
    ).body.token as string;
  });
  after(async () => t.close());

  it('answers every read as an empty store would, and the region still has no store of it', async () => {
    const get = (path: string) => as(auditor)(request(t.app).get(`/admin/tenants/quiet${path}`));
    const head = await get('/audit/head');
    expect(head.status, JSON.stringify(head.body)).to.equal(200);
    expect(head.body).to.include({ chain: 'tenant:quiet', seq: 0, hash: '0'.repeat(64) });
    const verify = await get('/audit/verify');
    expect(verify.status, JSON.stringify(verify.body)).to.equal(200);
    expect(verify.body).to.include({ ok: true, count: 0 });
    const list = await get('/invocations');
    expect(list.status, JSON.stringify(list.body)).to.equal(200);
    expect(list.body.invocations).to.deep.equal([]);
    const one = await get('/invocations/3f2b8c1e-7d4a-4e6b-9a1c-2d5e8f0a1b2c');
    expect(one.status, JSON.stringify(one.body)).to.equal(404);
    const summary = await get('/feedback/summary');
    expect(summary.status, JSON.stringify(summary.body)).to.equal(200);
    expect(summary.body.rows).to.deep.equal([]);

    expect(await t.deps.stores.listTenants()).to.not.include('quiet');
    // Nor did the reads write a key event anywhere: no key was made.
    const events = await as(t.adminToken)(request(t.app).get('/admin/audit?tenant=quiet'));
    const types = (events.body.events as Array<{ type: string }>).map((e) => e.type);
    expect(types).to.not.include('key.create');
    expect(types).to.include.members(['audit.head', 'audit.verify', 'records.list']);
  });
});
