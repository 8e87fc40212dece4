/**
 * A hook call for a tenant whose store this process is restoring is told to come back: 503
 * `unavailable` with Retry-After (not 409, which an EHR reads as its own mistake), and nothing
 * is recorded. Real HTTP, a real restore of a real backup (the call lands while the backup's copy
 * is staged).
 */
import path from 'node:path';
import { expect } from 'chai';
import request from 'supertest';
import { tinyPack, warfarinNsaidRequest } from '../helpers/packs.ts';
import { buildTestApp, PUBLIC_URL, type TestApp } from '../helpers/test-app.ts';
import type { TestIssuer } from '../helpers/test-issuer.ts';

describe('server/ a hook call during a restore of its tenant', function () {
  this.timeout(60_000);
  let t: TestApp;
  let issuer: TestIssuer;
  const url = `${PUBLIC_URL}/cds-services/tiny-order-sign`;
  const call = async () =>
    request(t.app)
      .post('/cds-services/tiny-order-sign')
      .set('authorization', `Bearer ${await issuer.sign({ aud: url })}`)
      .send(warfarinNsaidRequest());

  before(async () => {
    t = await buildTestApp();
    expect((await t.uploadPack(tinyPack('tiny'))).status).to.equal(201);
    issuer = await t.addTenant('hosp-a', { subscriptions: [{ pack: 'tiny', version: '1.0.0' }] });
    expect((await call()).status).to.equal(200);
  });
  after(async () => t.close());

  it('answers 503 + Retry-After while the copy is staged, 200 again once restored', async () => {
    const backup = await request(t.app)
      .post('/admin/tenants/hosp-a/backups')
      .set('authorization', `Bearer ${t.adminToken}`);
    expect(backup.status).to.equal(201);
    let during: request.Response | undefined;
    await t.deps.stores.restoreTenant(path.resolve(backup.body.path as string), {
      onStaged: async () => {
        during = await call();
      },
    });
    expect(during?.status, JSON.stringify(during?.body)).to.equal(503);
    expect(during?.body.error).to.equal('unavailable');
    expect(during?.headers['retry-after']).to.equal('10');
    expect((await call()).status).to.equal(200);
  });
});
