/**
 * tenants/ createIdTokenVerifier: the SMART card viewer's id_token check, below HTTP. The
 * hostile-token table over HTTP is in spec/ui/ui-api.spec.ts; this spec covers tenant choice
 * (shared issuers, FHIR server allowlists, hints), jwksUri keys and rotation, and azp.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { expect } from 'chai';
import {
  AuthError,
  createIdTokenVerifier,
  createJwksFetcher,
  openControlPlane,
} from '../../tenants/index.ts';
import type {
  AuthFailureReason,
  ControlPlane,
  IdTokenContext,
  IdTokenVerifier,
} from '../../tenants/index.ts';
import { startJwksServer, TestIssuer } from '../helpers/test-issuer.ts';
import type { JwksServer } from '../helpers/test-issuer.ts';

const CLIENT = 'card-viewer';
const FHIR_A = 'https://fhir.hospital-a.example.org/r4';
const FHIR_B = 'https://fhir.hospital-b.example.org/r4';
const FHIR_SHARED = 'https://fhir.shared.example.org/r4';

async function reasonOf(promise: Promise<unknown>): Promise<AuthFailureReason> {
  try {
    await promise;
  } catch (err) {
    if (err instanceof AuthError) {
      return err.reason;
    }
    throw err;
  }
  throw new Error('expected an AuthError');
}

describe('tenants/ createIdTokenVerifier (SMART launch id_tokens)', () => {
  let nowMs = Date.parse('2025-06-01T12:00:00Z');
  const clock = (): Date => new Date(nowMs);
  let hostedAuth: TestIssuer;
  let rotating: TestIssuer;
  let jwksServer: JwksServer;
  let dir: string;
  let cp: ControlPlane;
  let verifier: IdTokenVerifier;
  let failures: Array<{ reason: AuthFailureReason; tenant?: string }>;

  const claims = (extra: Record<string, unknown> = {}) => ({
    aud: CLIENT,
    sub: 'user-1',
    fhirUser: `${FHIR_A}/Practitioner/p1`,
    ...extra,
  });
  const verify = (jwt: string, context: IdTokenContext) =>
    verifier.verify(`Bearer ${jwt}`, context);

  before(async () => {
    // One vendor-hosted authorization server shared by three health systems.
    hostedAuth = await TestIssuer.create({ iss: 'https://auth.vendor.example.org', now: clock });
    rotating = await TestIssuer.create({ iss: 'https://auth.rotating.example.org', now: clock });
    jwksServer = await startJwksServer(rotating.publicJwks());
  });
  after(async () => jwksServer.close());

  beforeEach(async () => {
    nowMs = Date.parse('2025-06-01T12:00:00Z');
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cellcds-'));
    cp = await openControlPlane({ storage: path.join(dir, 'control.sqlite'), now: clock });
    const hosted = { iss: hostedAuth.iss, jwks: hostedAuth.publicJwks() };
    const create = (id: string, fhirServers: string[], issuers: unknown[] = [hosted]) =>
      cp.tenants.create({
        id,
        name: id,
        region: 'eu-west',
        fhirServers,
        issuers: issuers as never,
        // hospital-b and the shared-* tenants join hostedAuth's issuer: the operator confirms it.
        sharedIssuer: true,
      });
    await create('hospital-a', [FHIR_A]);
    await create('hospital-b', [FHIR_B]);
    await create('shared-1', [FHIR_SHARED]);
    await create('shared-2', [FHIR_SHARED]);
    await create('rotating', [FHIR_A], [{ iss: rotating.iss, jwksUri: jwksServer.url('/keys') }]);
    jwksServer.setJwks(rotating.publicJwks());
    failures = [];
    verifier = createIdTokenVerifier({
      controlPlane: cp,
      clientIds: [CLIENT],
      jwks: createJwksFetcher({ now: clock, timeoutMs: 2000 }),
      now: clock,
      onFailure: (reason, info) =>
        failures.push({ reason, ...(info.tenant ? { tenant: info.tenant } : {}) }),
    });
  });
  afterEach(async () => {
    await cp.close();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it('picks the one tenant of a shared issuer that allowlists the FHIR server', async () => {
    const jwt = await hostedAuth.sign(claims());
    expect((await verify(jwt, { fhirServer: FHIR_A })).tenant.id).to.equal('hospital-a');
    const jwtB = await hostedAuth.sign(claims({ fhirUser: `${FHIR_B}/Practitioner/p2` }));
    expect((await verify(jwtB, { fhirServer: `${FHIR_B}/` })).tenant.id).to.equal('hospital-b');
    const id = await verify(jwt, { fhirServer: FHIR_A });
    expect(id).to.deep.include({ iss: hostedAuth.iss, sub: 'user-1', clientId: CLIENT });
    expect(id.fhirUser).to.equal(`${FHIR_A}/Practitioner/p1`);
  });

  it("tenants sharing an issuer and a client id: the token's fhirUser, not the caller, says which", async () => {
    // hospital-a and hospital-b both accept CLIENT from the same authorization server: the
    // caller's fhirServer (or hint) alone must not let a clinician of one act as the other.
    const ofA = await hostedAuth.sign(claims());
    expect(await reasonOf(verify(ofA, { fhirServer: FHIR_B }))).to.equal('bad_tenant');
    expect(await reasonOf(verify(ofA, { fhirServer: FHIR_B, tenant: 'hospital-b' }))).to.equal(
      'bad_tenant',
    );
    for (const fhirUser of [
      undefined,
      'Practitioner/p1',
      `${FHIR_B}x/Practitioner/p1`,
      `${FHIR_B}/Practitioner`,
      `${FHIR_A}/Practitioner/p1`,
    ]) {
      const jwt = await hostedAuth.sign(claims({ fhirUser }));
      expect(await reasonOf(verify(jwt, { fhirServer: FHIR_B })), String(fhirUser)).to.equal(
        'bad_tenant',
      );
    }
    expect(failures.every((f) => f.reason === 'bad_tenant' && f.tenant === 'hospital-b')).to.equal(
      true,
    );
    // With a client id of its own, hospital-b's tokens name it and A's default no longer fits B.
    await cp.tenants.update('hospital-b', { smart: { clientId: 'client-b' } });
    expect(await reasonOf(verify(ofA, { fhirServer: FHIR_B }))).to.equal('bad_aud');
    // client-b proves hospital-b without a fhirUser (no other tenant accepts it).
    const forB = await hostedAuth.sign(claims({ aud: 'client-b', fhirUser: undefined }));
    expect((await verify(forB, { fhirServer: FHIR_B })).tenant.id).to.equal('hospital-b');
  });

  it('needs a tenant hint when several tenants allow the same FHIR server, and honours it', async () => {
    // shared-1 and shared-2 list the same FHIR server: only client ids of their own tell them
    // apart (the hint chooses which; the token's aud must agree).
    await cp.tenants.update('shared-1', { smart: { clientId: 'client-1' } });
    await cp.tenants.update('shared-2', { smart: { clientId: 'client-2' } });
    const jwt = await hostedAuth.sign(claims({ aud: 'client-2' }));
    expect(await reasonOf(verify(jwt, { fhirServer: FHIR_SHARED }))).to.equal('bad_tenant');
    expect((await verify(jwt, { fhirServer: FHIR_SHARED, tenant: 'shared-2' })).tenant.id).to.equal(
      'shared-2',
    );
    expect(await reasonOf(verify(jwt, { fhirServer: FHIR_SHARED, tenant: 'shared-1' }))).to.equal(
      'bad_aud',
    );
  });

  it('refuses tenants sharing an issuer, a client id and a FHIR server: nothing in the token tells them apart', async () => {
    const fhirUser = `${FHIR_SHARED}/Practitioner/p1`;
    const jwt = await hostedAuth.sign(claims({ fhirUser }));
    for (const tenant of ['shared-1', 'shared-2']) {
      expect(await reasonOf(verify(jwt, { fhirServer: FHIR_SHARED, tenant }))).to.equal(
        'bad_tenant',
      );
    }
    await cp.tenants.update('shared-2', { smart: { clientId: 'client-2' } });
    expect((await verify(jwt, { fhirServer: FHIR_SHARED, tenant: 'shared-1' })).tenant.id).to.equal(
      'shared-1',
    );
  });

  it('refuses a hint naming a tenant that does not allow the FHIR server', async () => {
    const jwt = await hostedAuth.sign(claims());
    expect(await reasonOf(verify(jwt, { fhirServer: FHIR_A, tenant: 'hospital-b' }))).to.equal(
      'bad_tenant',
    );
    expect(await reasonOf(verify(jwt, { fhirServer: 'not a url' }))).to.equal('bad_tenant');
    expect(await reasonOf(verify(jwt, { fhirServer: `${FHIR_A}?x=1` }))).to.equal('bad_tenant');
    expect(failures.map((f) => f.reason)).to.deep.equal(['bad_tenant', 'bad_tenant', 'bad_tenant']);
  });

  it('accepts several audiences only with azp = the client id', async () => {
    const both = await hostedAuth.sign(claims({ aud: [CLIENT, 'other'], azp: CLIENT }));
    expect((await verify(both, { fhirServer: FHIR_A })).clientId).to.equal(CLIENT);
    const single = await hostedAuth.sign(claims({ azp: CLIENT }));
    expect((await verify(single, { fhirServer: FHIR_A })).clientId).to.equal(CLIENT);
  });

  it('accepts an id_token without typ, and refuses one with typ at+jwt', async () => {
    const noTyp = await hostedAuth.sign(claims(), { header: { typ: undefined } });
    expect((await verify(noTyp, { fhirServer: FHIR_A })).tenant.id).to.equal('hospital-a');
    const at = await hostedAuth.sign(claims(), { typ: 'at+jwt' });
    expect(await reasonOf(verify(at, { fhirServer: FHIR_A }))).to.equal('bad_typ');
  });

  it('reads keys from a registered jwksUri and picks up a rotated key', async () => {
    const jwt = await rotating.sign(claims());
    expect((await verify(jwt, { fhirServer: FHIR_A, tenant: 'rotating' })).tenant.id).to.equal(
      'rotating',
    );
    const kid = await rotating.addKey('ES256');
    jwksServer.setJwks(rotating.publicJwks());
    nowMs += 60_000; // past the fetcher's refetch cooldown
    const rotated = await rotating.sign(claims(), { signingKid: kid });
    expect((await verify(rotated, { fhirServer: FHIR_A, tenant: 'rotating' })).tenant.id).to.equal(
      'rotating',
    );
  });

  it('lets the same id_token be used for several calls until it expires', async () => {
    const jwt = await hostedAuth.sign(claims());
    await verify(jwt, { fhirServer: FHIR_A });
    await verify(jwt, { fhirServer: FHIR_A });
    nowMs += 301_000 + 60_000; // exp (iat + 300) plus the leeway
    expect(await reasonOf(verify(jwt, { fhirServer: FHIR_A }))).to.equal('expired');
  });

  it('refuses to be built without a client id or with a symmetric algorithm', () => {
    expect(() => createIdTokenVerifier({ controlPlane: cp, clientIds: [] })).to.throw(/client id/);
    expect(() => createIdTokenVerifier({ controlPlane: cp, clientIds: [''] })).to.throw(
      /client id/,
    );
    expect(() =>
      createIdTokenVerifier({ controlPlane: cp, clientIds: [CLIENT], algorithms: ['HS256'] }),
    ).to.throw(/asymmetric/);
  });
});
