/**
 * Tenants that share an EHR's authorization server (one issuer) and the viewer's client id: the
 * id_token says nothing about the health system but its `fhirUser`, so the caller's `tenant`
 * hint and `fhirServer` must not choose the tenant alone. A clinician of hospital B must not get
 * hospital A's cards, write an invocation (with PHI) into A's store or post feedback there.
 * Found by review: both used to answer 200 as hospital-a.
 */
import { expect } from 'chai';
import request from 'supertest';
import { startFhirServer } from '../helpers/fhir-server.ts';
import type { TestFhirServer } from '../helpers/fhir-server.ts';
import { shippedPackRaw, shippedPackVersion } from '../helpers/test-app.ts';
import { TestIssuer } from '../helpers/test-issuer.ts';
import { startUiApp } from '../helpers/ui-app.ts';
import type { UiApp } from '../helpers/ui-app.ts';

const DEFAULT_ID = 'cellcds-default-viewer';
const FHIR_B = 'https://fhir.hospital-b.test.example/r4';

describe('card viewer: tenants sharing an issuer and a client id', function () {
  this.timeout(60_000);
  let u: UiApp;
  let ehr: TestIssuer;
  let fhir: TestFhirServer;

  const add = (id: string, fhirServers: string[]) =>
    request(u.handler)
      .post('/admin/tenants')
      .set('authorization', `Bearer ${u.t.adminToken}`)
      .send({
        id,
        name: id,
        region: u.t.deps.config.region,
        issuers: [{ iss: ehr.iss, jwks: ehr.publicJwks() }],
        fhirServers,
        // hospital-b makes the issuer shared: the operator confirms it (a no-op for hospital-a).
        sharedIssuer: true,
      });

  before(async () => {
    ehr = await TestIssuer.create({ iss: 'https://auth.shared-ehr.test.example' });
    fhir = await startFhirServer({
      patientFile: 'Mafalda_Turcotte_80833fb2-95c1-4f5b-ab5e-26230287ee61.json',
    });
    u = await startUiApp({ smartClientId: DEFAULT_ID });
    expect((await u.t.uploadPack(shippedPackRaw())).status).to.equal(201);
    // Neither has a client id of its own: both accept the default from the same issuer.
    expect((await add('hospital-a', [fhir.baseUrl])).status).to.equal(201);
    expect((await add('hospital-b', [FHIR_B])).status).to.equal(201);
    for (const id of ['hospital-a', 'hospital-b']) {
      const sub = await request(u.handler)
        .put(`/admin/tenants/${id}/subscriptions`)
        .set('authorization', `Bearer ${u.t.adminToken}`)
        .send([{ pack: 'medication-safety', version: shippedPackVersion() }]);
      expect(sub.status).to.equal(200);
    }
  });
  after(async () => {
    await u.close();
    await fhir.close();
  });

  const patientView = (jwt: string, tenant?: string) =>
    request(u.handler)
      .post('/app/api/patient-view')
      .set('authorization', `Bearer ${jwt}`)
      .send({
        fhirServer: fhir.baseUrl,
        ...(tenant === undefined ? {} : { tenant }),
        fhirAuthorization: {
          access_token: fhir.token,
          token_type: 'Bearer',
          patient: fhir.record.patientId,
        },
        context: { patientId: fhir.record.patientId },
      });

  it("refuses a B clinician's id_token on A's FHIR server (401), with or without a hint; nothing fetched, stored or audited as a success", async () => {
    const ofB = await ehr.sign({
      aud: DEFAULT_ID,
      sub: 'user-of-b',
      fhirUser: `${FHIR_B}/Practitioner/b-1`,
    });
    const noUser = await ehr.sign({ aud: DEFAULT_ID, sub: 'user-of-b' });
    const store = u.t.deps.stores.store('hospital-a');
    const before = (await store.listInvocations()).length;
    const fetched = fhir.requests.length;
    for (const [jwt, hint] of [
      [ofB, 'hospital-a'],
      [ofB, undefined],
      [noUser, 'hospital-a'],
    ] as const) {
      const res = await patientView(jwt, hint);
      expect(res.status, JSON.stringify(res.body)).to.equal(401);
      expect(res.body).to.deep.equal({ error: 'invalid_token', message: 'invalid token' });
    }
    const feedback = await request(u.handler)
      .post('/app/api/feedback')
      .set('authorization', `Bearer ${ofB}`)
      .send({
        fhirServer: fhir.baseUrl,
        tenant: 'hospital-a',
        service: 'medication-safety-patient-view',
        feedback: [
          {
            card: '00000000-0000-4000-8000-000000000000',
            outcome: 'overridden',
            outcomeTimestamp: new Date().toISOString(),
          },
        ],
      });
    expect(feedback.status, JSON.stringify(feedback.body)).to.equal(401);
    expect((await store.listInvocations()).length).to.equal(before);
    expect(fhir.requests.length).to.equal(fetched);
    const audit = await u.t.deps.controlPlane.audit.list({ type: 'auth.failure' });
    expect(audit.slice(-4).map((e) => (e.detail as { reason?: string }).reason)).to.deep.equal([
      'bad_tenant',
      'bad_tenant',
      'bad_tenant',
      'bad_tenant',
    ]);
  });

  it("serves an A clinician whose fhirUser is on A's FHIR server", async () => {
    const ofA = await ehr.sign({
      aud: DEFAULT_ID,
      sub: 'user-of-a',
      fhirUser: `${fhir.baseUrl}/Practitioner/a-1`,
    });
    const res = await patientView(ofA);
    expect(res.status, JSON.stringify(res.body)).to.equal(200);
    expect(res.body.tenant).to.equal('hospital-a');
  });
});
