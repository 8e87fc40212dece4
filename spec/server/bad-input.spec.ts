import { expect } from 'chai';
import request from 'supertest';
import { buildTestApp, PUBLIC_URL, type TestApp } from '../helpers/test-app.ts';
import { tinyPack, warfarinNsaidRequest } from '../helpers/packs.ts';
import type { TestIssuer } from '../helpers/test-issuer.ts';

describe('bad input gets a clear 4xx and changes nothing', () => {
  let t: TestApp;
  let a: TestIssuer;
  const url = `${PUBLIC_URL}/cds-services/tiny-order-sign`;
  // A supertest Test is thenable, so sign first and build the request synchronously.
  const post = (token: string) =>
    request(t.app).post('/cds-services/tiny-order-sign').set('authorization', `Bearer ${token}`);
  const token = () => a.sign({ aud: url });

  before(async () => {
    t = await buildTestApp();
    expect((await t.uploadPack(tinyPack('tiny'))).status).to.equal(201);
    a = await t.addTenant('tenant-a', { subscriptions: [{ pack: 'tiny', version: '1.0.0' }] });
  });
  after(async () => t.close());

  it('malformed JSON: 400', async () => {
    const res = await post(await token())
      .set('content-type', 'application/json')
      .send('{"hook": "order-sign",');
    expect(res.status).to.equal(400);
    expect(res.body.error).to.equal('invalid_request');
  });

  it('wrong content type: 415', async () => {
    const res = await post(await token())
      .set('content-type', 'text/plain')
      .send('hello');
    expect(res.status).to.equal(415);
    expect(res.body.error).to.equal('unsupported_media_type');
  });

  it('a 10 MB body: 413', async () => {
    const big = { ...warfarinNsaidRequest(), padding: 'x'.repeat(10 * 1024 * 1024) };
    const res = await post(await token()).send(big);
    expect(res.status).to.equal(413);
    expect(res.body.error).to.equal('payload_too_large');
  });

  it('a body over the limit: 413 naming the limit in bytes and its setting, as the pack upload does', async () => {
    const limit = t.deps.config.bodyLimitBytes;
    const big = JSON.stringify({ ...warfarinNsaidRequest(), padding: 'x'.repeat(limit) });
    for (const type of ['application/json', 'application/fhir+json']) {
      const res = await post(await token())
        .set('content-type', type)
        .send(big);
      expect(res.status).to.equal(413);
      expect(res.body.error).to.equal('payload_too_large');
      expect(res.body.message).to.equal(
        `a CDS Hooks request body may be at most ${limit} bytes (the server's CELLCDS_BODY_LIMIT_BYTES)`,
      );
      expect(res.body.limitBytes).to.equal(limit);
    }
    const feedback = await request(t.app)
      .post('/cds-services/tiny-order-sign/feedback')
      .set('authorization', `Bearer ${await token()}`)
      .set('content-type', 'application/json')
      .send(big);
    expect(feedback.status).to.equal(413);
    expect(feedback.body.limitBytes).to.equal(limit);
    expect(feedback.body.message).to.include('CELLCDS_BODY_LIMIT_BYTES');
  });

  it('an unknown hook: 400 naming hook', async () => {
    const res = await post(await token()).send({
      ...warfarinNsaidRequest(),
      hook: 'medication-prescribe',
    });
    expect(res.status).to.equal(400);
    expect(res.body.field).to.equal('hook');
  });

  it('a hookInstance that is not a UUID: 400 naming hookInstance', async () => {
    const res = await post(await token()).send({ ...warfarinNsaidRequest(), hookInstance: 'abc' });
    expect(res.status).to.equal(400);
    expect(res.body.field).to.equal('hookInstance');
  });

  it('fhirAuthorization without fhirServer: 400 naming fhirServer', async () => {
    const body = {
      ...warfarinNsaidRequest(),
      fhirAuthorization: {
        access_token: 'secret-token-xyz',
        token_type: 'Bearer',
        expires_in: 300,
        scope: 'patient/*.read',
        subject: 'cds',
      },
    };
    const res = await post(await token()).send(body);
    expect(res.status).to.equal(400);
    expect(res.body.field).to.equal('fhirServer');
    expect(JSON.stringify(res.body)).to.not.include('secret-token-xyz');
  });

  it('__proto__ keys do not pollute anything and get a 4xx or are ignored', async () => {
    const raw = JSON.stringify(warfarinNsaidRequest()).replace(
      '"context":{',
      '"context":{"__proto__":{"polluted":true},',
    );
    const res = await post(await token())
      .set('content-type', 'application/json')
      .send(raw);
    expect([200, 400]).to.include(res.status);
    expect(({} as Record<string, unknown>).polluted).to.equal(undefined);
    const raw2 = JSON.stringify(warfarinNsaidRequest()).replace(
      '{"hook"',
      '{"__proto__":{"isAdmin":true},"hook"',
    );
    const res2 = await post(await token())
      .set('content-type', 'application/json')
      .send(raw2);
    expect([200, 400]).to.include(res2.status);
    expect(({} as Record<string, unknown>).isAdmin).to.equal(undefined);
  });

  it('a body that is not an object: 400', async () => {
    const res = await post(await token()).send([1, 2, 3]);
    expect(res.status).to.equal(400);
  });

  it('an unknown admin route: 404 JSON; a bad admin token: 401', async () => {
    const res = await request(t.app)
      .get('/admin/nothing')
      .set('authorization', `Bearer ${t.adminToken}`);
    expect(res.status).to.equal(404);
    expect(res.body.error).to.equal('not_found');
    const bad = await request(t.app)
      .get('/admin/tenants')
      .set('authorization', 'Bearer not-a-token');
    expect(bad.status).to.equal(401);
    expect(bad.headers['www-authenticate']).to.equal('Bearer');
  });
});
