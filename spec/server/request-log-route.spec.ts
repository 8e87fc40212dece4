import { expect } from 'chai';
import request from 'supertest';
import { tinyPack, warfarinNsaidRequest } from '../helpers/packs.ts';
import { buildTestApp, type TestApp } from '../helpers/test-app.ts';

interface LogLine {
  msg: string;
  route?: string;
  status?: number;
}

/**
 * The `request refused` / `request failed` line names the full route pattern, mount prefix
 * included (`/cds-services/:id`, not `/:id`), and never the client's ids.
 */
describe('request log line: route', () => {
  let t: TestApp;
  before(async () => {
    t = await buildTestApp();
    expect((await t.uploadPack(tinyPack('tiny'))).status).to.equal(201);
  });
  after(async () => t.close());

  const lastRefusal = (): LogLine | undefined =>
    t.logLines
      .map((l) => JSON.parse(l) as LogLine)
      .filter((l) => l.msg === 'request refused')
      .at(-1);

  it('logs the hook route with its mount prefix', async () => {
    const res = await request(t.app)
      .post('/cds-services/tiny-order-sign')
      .set('authorization', 'Bearer not-a-token')
      .send(warfarinNsaidRequest());
    expect(res.status).to.equal(401);
    expect(lastRefusal()).to.include({ route: '/cds-services/:id', status: 401 });
  });

  it('logs the admin route with its mount prefix', async () => {
    const res = await request(t.app)
      .post('/admin/tenants/no-such-tenant/keys/rotate')
      .set('authorization', `Bearer ${t.adminToken}`)
      .send({});
    expect(res.status).to.equal(404);
    expect(lastRefusal()).to.include({
      route: '/admin/tenants/:id/keys/rotate',
      status: 404,
    });
  });
});
