import { expect } from 'chai';
import request from 'supertest';
import { buildTestApp, PUBLIC_URL, type TestApp } from '../helpers/test-app.ts';
import { tinyPack, warfarinNsaidRequest } from '../helpers/packs.ts';
import { TestIssuer } from '../helpers/test-issuer.ts';

const redisUrl = process.env.CELLCDS_TEST_REDIS_URL;

/** Two replicas behind a load balancer share the replay cache in the real Redis. */
describe('scale-out: replicas share the jti replay cache (Redis)', function () {
  if (!redisUrl) {
    it('needs CELLCDS_TEST_REDIS_URL (e.g. redis://127.0.0.1:6379)');
    return;
  }
  let one: TestApp;
  let two: TestApp;
  let issuer: TestIssuer;
  const url = `${PUBLIC_URL}/cds-services/tiny-order-sign`;

  before(async () => {
    issuer = await TestIssuer.create({
      iss: `https://ehr-scale-${process.pid}-${Date.now()}.example`,
    });
    one = await buildTestApp({ CELLCDS_REDIS_URL: redisUrl });
    two = await buildTestApp({ CELLCDS_REDIS_URL: redisUrl });
    for (const t of [one, two]) {
      expect((await t.uploadPack(tinyPack('tiny'))).status).to.equal(201);
      await t.addTenant('hosp', { subscriptions: [{ pack: 'tiny', version: '1.0.0' }], issuer });
    }
  });
  after(async () => {
    await one.close();
    await two.close();
  });

  it('refuses on replica two a token already used on replica one', async () => {
    const token = await issuer.sign({ aud: url });
    const first = await request(one.app)
      .post('/cds-services/tiny-order-sign')
      .set('authorization', `Bearer ${token}`)
      .send(warfarinNsaidRequest());
    expect(first.status).to.equal(200);
    const replay = await request(two.app)
      .post('/cds-services/tiny-order-sign')
      .set('authorization', `Bearer ${token}`)
      .send(warfarinNsaidRequest());
    expect(replay.status).to.equal(401);
    const fresh = await request(two.app)
      .post('/cds-services/tiny-order-sign')
      .set('authorization', `Bearer ${await issuer.sign({ aud: url })}`)
      .send(warfarinNsaidRequest());
    expect(fresh.status).to.equal(200);
  });
});
