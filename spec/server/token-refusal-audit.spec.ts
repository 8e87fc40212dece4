/**
 * What the operator finds in the audit trail for a refused CDS client token: enough to tell
 * the EHR's integrator what to fix (which claim is missing, which kid, which aud was sent and
 * which was expected, why the issuer's keys could not be fetched), while the caller still gets
 * the bare 401.
 */
import crypto from 'node:crypto';
import { expect } from 'chai';
import request from 'supertest';
import { buildTestApp, PUBLIC_URL, type TestApp } from '../helpers/test-app.ts';
import { tinyPack, warfarinNsaidRequest } from '../helpers/packs.ts';
import { startJwksServer, TestIssuer, type JwksServer } from '../helpers/test-issuer.ts';

describe('server/ refused client tokens: audit detail for the operator', () => {
  let t: TestApp;
  let a: TestIssuer;
  let remote: TestIssuer;
  let keys: JwksServer;
  const url = `${PUBLIC_URL}/cds-services/tiny-order-sign`;

  before(async () => {
    t = await buildTestApp();
    expect((await t.uploadPack(tinyPack('tiny'))).status).to.equal(201);
    a = await t.addTenant('tenant-a', { subscriptions: [{ pack: 'tiny', version: '1.0.0' }] });
    // A tenant whose issuer publishes its keys at a URL (jwksUri), served by a local server.
    remote = await TestIssuer.create({ iss: 'https://ehr-remote.test.example' });
    keys = await startJwksServer(remote.publicJwks());
    const res = await request(t.app)
      .post('/admin/tenants')
      .set('authorization', `Bearer ${t.adminToken}`)
      .send({
        id: 'tenant-r',
        name: 'Tenant r',
        region: t.deps.config.region,
        issuers: [{ iss: remote.iss, jwksUri: keys.url('/jwks') }],
        fhirServers: [],
      });
    expect(res.status).to.equal(201);
    const sub = await request(t.app)
      .put('/admin/tenants/tenant-r/subscriptions')
      .set('authorization', `Bearer ${t.adminToken}`)
      .send([{ pack: 'tiny', version: '1.0.0' }]);
    expect(sub.status).to.equal(200);
  });
  after(async () => {
    await keys.close();
    await t.close();
  });

  /** Calls the hook with `authorization`; asserts the bare 401 and returns the audit detail. */
  async function refusedDetail(authorization: string): Promise<Record<string, unknown>> {
    const res = await request(t.app)
      .post('/cds-services/tiny-order-sign')
      .set('authorization', authorization)
      .send(warfarinNsaidRequest());
    expect(res.status).to.equal(401);
    expect(res.headers['www-authenticate']).to.equal('Bearer');
    expect(res.headers['retry-after']).to.equal(undefined);
    expect(res.body).to.deep.equal({ error: 'invalid_token', message: 'invalid token' });
    const requestId = res.headers['x-request-id'] as string;
    const events = await t.deps.controlPlane.audit.list({ type: 'auth.failure' });
    const event = events.find((e) => e.detail?.requestId === requestId);
    expect(event, 'the refusal is audited under its X-Request-Id').to.not.equal(undefined);
    const jwt = authorization.split(' ')[1] ?? '';
    expect(JSON.stringify(event)).to.not.include(jwt);
    return event?.detail ?? {};
  }

  for (const claim of ['jti', 'iat', 'exp', 'iss', 'aud'] as const) {
    it(`names the missing claim (${claim})`, async () => {
      const detail = await refusedDetail(
        `Bearer ${await a.sign({ aud: url, [claim]: undefined })}`,
      );
      expect(detail).to.include({ reason: 'missing_claim', claim });
    });
  }

  it('records a token without a kid as missing_kid, not unknown_kid', async () => {
    const detail = await refusedDetail(
      `Bearer ${await a.sign({ aud: url }, { header: { kid: undefined } })}`,
    );
    expect(detail.reason).to.equal('missing_kid');
    expect(detail).to.not.have.property('kid');
  });

  it('records a kid the issuer does not publish as unknown_kid, naming the kid', async () => {
    const detail = await refusedDetail(
      `Bearer ${await a.sign({ aud: url }, { kid: 'rotated-2026-11' })}`,
    );
    expect(detail).to.include({ reason: 'unknown_kid', kid: 'rotated-2026-11' });
  });

  it("never writes a kid's free text to the audit: only its length and a sha256 prefix", async () => {
    const kid = 'Jane Doe DOB 1950-01-01 <script>';
    const detail = await refusedDetail(`Bearer ${await a.sign({ aud: url }, { kid })}`);
    expect(detail).to.include({
      reason: 'unknown_kid',
      kidLength: kid.length,
      kidSha256: crypto.createHash('sha256').update(kid).digest('hex').slice(0, 12),
    });
    expect(detail).to.not.have.property('kid');
    expect(JSON.stringify(detail)).to.not.include('Jane');
  });

  it('records the received aud and the expected URL of a bad_aud', async () => {
    const other = `${PUBLIC_URL}/cds-services/other`;
    const detail = await refusedDetail(`Bearer ${await a.sign({ aud: other })}`);
    expect(detail).to.include({ reason: 'bad_aud', aud1: other, audCount: 1, expectedAud: url });
  });

  it('bounds the recorded aud values: at most 5, 200 characters each', async () => {
    const long = `https://ehr.example/${'x'.repeat(500)}`;
    const many = [long, 'https://b.example', 'https://c.example', 'd', 'e', 'f', 'g'];
    const detail = await refusedDetail(`Bearer ${await a.sign({ aud: many })}`);
    expect(detail).to.include({ reason: 'bad_aud', audCount: 7, expectedAud: url });
    expect(detail.aud1).to.equal(long.slice(0, 200));
    expect(detail.aud5).to.equal('e');
    expect(detail).to.not.have.property('aud6');
  });

  it('records a bad_aud whose aud is not a list of strings without its values', async () => {
    const detail = await refusedDetail(`Bearer ${await a.sign({ aud: [42, { x: 1 }] })}`);
    expect(detail).to.include({ reason: 'bad_aud', audCount: 2, expectedAud: url });
    expect(detail.aud1).to.equal('(not a string)');
  });

  it('counts missing_kid under its own metric label', async () => {
    await refusedDetail(`Bearer ${await a.sign({ aud: url }, { header: { kid: undefined } })}`);
    const text = await t.deps.metrics.registry.metrics();
    expect(text).to.match(/cellcds_auth_failures_total\{[^}]*reason="missing_kid"[^}]*\} [1-9]/);
  });

  it("refuses a token when the issuer's JWKS cannot be fetched: the same bare 401 as an unregistered iss, the fetch error audited", async () => {
    keys.setHandler((_req, res) => {
      res.status(503).send('down');
    });
    try {
      const detail = await refusedDetail(`Bearer ${await remote.sign({ aud: url })}`);
      expect(detail).to.include({
        reason: 'jwks_unavailable',
        jwksError: 'jwks: HTTP 503',
        jwksUrl: keys.url('/jwks'),
      });
      // An unregistered iss gets exactly the same answer (status, headers, body): a 503 here
      // would tell anyone which issuers (and tenants) are registered, whenever their key server
      // is down.
      const stranger = await TestIssuer.create({ iss: 'https://stranger.example' });
      const unknown = await refusedDetail(`Bearer ${await stranger.sign({ aud: url })}`);
      expect(unknown.reason).to.equal('unknown_issuer');
    } finally {
      keys.setHandler(undefined);
    }
  });
});
