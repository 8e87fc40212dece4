/**
 * A tenant still registered whose data this region has crypto-shredded (a standby region shred
 * with `tenant.shred.region`, then a failover declared to it again): its key here is destroyed
 * for good. Its calls used to answer 500 `internal` (retried by EHRs, paged as a server fault,
 * fixed by nothing); they answer 409 `conflict` naming the state, and nothing is created.
 */
import { expect } from 'chai';
import request from 'supertest';
import { buildTestApp, PUBLIC_URL, type TestApp } from '../helpers/test-app.ts';
import { tinyPack, warfarinNsaidRequest } from '../helpers/packs.ts';
import type { TestIssuer } from '../helpers/test-issuer.ts';

describe('a call for a tenant whose key this region destroyed', function () {
  this.timeout(60_000);
  let t: TestApp;
  let issuer: TestIssuer;
  const url = `${PUBLIC_URL}/cds-services/tiny-order-sign`;

  before(async () => {
    t = await buildTestApp();
    expect((await t.uploadPack(tinyPack('tiny'))).status).to.equal(201);
    issuer = await t.addTenant('shred-a', { subscriptions: [{ pack: 'tiny', version: '1.0.0' }] });
  });
  after(async () => t.close());

  it('answers 409 conflict naming the destroyed key, not 500, and creates no store', async () => {
    const call = async () =>
      request(t.app)
        .post('/cds-services/tiny-order-sign')
        .set('authorization', `Bearer ${await issuer.sign({ aud: url })}`)
        .send(warfarinNsaidRequest());
    expect((await call()).status).to.equal(200);
    await t.deps.stores.deprovisionTenant('shred-a');
    const res = await call();
    expect(res.status, JSON.stringify(res.body)).to.equal(409);
    expect(res.body.error).to.equal('conflict');
    expect(res.body.message).to.match(/key.*destroyed in this region/);
    expect(await t.deps.stores.listTenants()).to.not.include('shred-a');
  });
});
