/**
 * The card viewer's HTTP surface without a browser: static files and their headers, the
 * playground API (operator auth, evaluation, bad input, nothing stored), and the SMART app
 * API failing closed on every id_token an attacker could bring.
 */
import fs from 'node:fs';
import path from 'node:path';
import { expect } from 'chai';
import request from 'supertest';
import type { FeedbackItem } from '../../hooks/index.ts';
import { startFhirServer } from '../helpers/fhir-server.ts';
import type { TestFhirServer } from '../helpers/fhir-server.ts';
import { tinyPack } from '../helpers/packs.ts';
import { shippedPackRaw, shippedPackVersion } from '../helpers/test-app.ts';
import { TestIssuer } from '../helpers/test-issuer.ts';
import { startUiApp } from '../helpers/ui-app.ts';
import type { UiApp } from '../helpers/ui-app.ts';

const KYLA = 'Kyla_Zulauf_4ac88c8f-1b22-441b-9f8c-c7d7f9c3ddc5.json';
const MAFALDA = 'Mafalda_Turcotte_80833fb2-95c1-4f5b-ab5e-26230287ee61.json';
const RXNORM = 'http://www.nlm.nih.gov/research/umls/rxnorm';
const IBUPROFEN = {
  resourceType: 'MedicationRequest',
  status: 'draft',
  intent: 'order',
  medicationCodeableConcept: {
    coding: [{ system: RXNORM, code: '310965', display: 'Ibuprofen 200 MG Oral Tablet' }],
  },
};
const CLIENT_ID = 'cellcds-card-viewer';

/** Files under the data dir, relative (to show that nothing per-tenant was written). */
function dataFiles(dir: string): string[] {
  return fs
    .readdirSync(dir, { recursive: true, encoding: 'utf8' })
    .filter((f) => fs.statSync(path.join(dir, f)).isFile())
    .sort();
}

describe('card viewer: static pages and vendor files', () => {
  let u: UiApp;
  before(async () => {
    u = await startUiApp();
  });
  after(async () => u.close());

  for (const [page, framed] of [
    ['/playground', false],
    ['/app/', true],
    ['/app/launch', true],
  ] as const) {
    it(`serves ${page} with a script-src 'self' CSP, nosniff and no referrer`, async () => {
      const res = await request(u.handler).get(page);
      expect(res.status).to.equal(200);
      expect(res.type).to.equal('text/html');
      const csp = String(res.headers['content-security-policy']);
      expect(csp).to.include("script-src 'self'");
      expect(csp).to.include("default-src 'none'");
      expect(csp).to.not.include('unsafe-inline');
      expect(csp.includes("frame-ancestors 'none'")).to.equal(!framed);
      expect(res.headers['x-content-type-options']).to.equal('nosniff');
      expect(res.headers['referrer-policy']).to.equal('no-referrer');
      expect(res.headers['cache-control']).to.equal('no-store');
    });
  }

  it('serves the vendor bundles from node_modules (no CDN)', async () => {
    for (const f of ['fhir-client.js', 'marked.js', 'purify.js']) {
      const res = await request(u.handler).get(`/ui/vendor/${f}`);
      expect(res.status, f).to.equal(200);
      expect(res.headers['content-type']).to.equal('text/javascript; charset=utf-8');
      expect(res.text.length).to.be.greaterThan(1000);
    }
    const html =
      (await request(u.handler).get('/playground')).text +
      (await request(u.handler).get('/app/')).text;
    expect(html).to.not.match(/https?:\/\//);
  });

  it('serves only listed files: traversal and unknown names are 404', async () => {
    for (const p of [
      '/ui/..%2Fui-routes.ts',
      '/ui/README.md',
      '/ui/vendor/..%2F..%2Fpackage.json',
      '/ui/vendor/jquery.js',
      '/ui/%2e%2e/ui-routes.ts',
    ]) {
      const res = await request(u.handler).get(p);
      expect(res.status, p).to.equal(404);
      expect(res.text).to.not.include('import');
    }
  });

  it('redirects /app to /app/ keeping the OAuth query', async () => {
    const res = await request(u.handler).get('/app?code=abc&state=xyz');
    expect(res.status).to.equal(302);
    expect(res.headers.location).to.equal('/app/?code=abc&state=xyz');
  });

  it('says SMART mode is not configured when no client id is set', async () => {
    const res = await request(u.handler).get('/app/api/config');
    expect(res.body).to.deep.equal({ configured: false });
  });
});

describe('card viewer: playground API', () => {
  let u: UiApp;
  let ruleAuthor: string;
  let tenantAdmin: string;
  let auditor: string;

  before(async () => {
    u = await startUiApp();
    expect((await u.t.uploadPack(shippedPackRaw())).status).to.equal(201);
    expect((await u.t.uploadPack(tinyPack('tiny'))).status).to.equal(201);
    await u.t.addTenant('tenant-a');
    const tokens = u.t.deps.controlPlane.adminTokens;
    ruleAuthor = (await tokens.issue({ role: 'rule-author' })).token;
    tenantAdmin = (await tokens.issue({ role: 'tenant-admin', tenant: 'tenant-a' })).token;
    auditor = (await tokens.issue({ role: 'auditor', tenant: 'tenant-a' })).token;
  });
  after(async () => u.close());

  const evaluate = (token: string, body: unknown) =>
    request(u.handler)
      .post('/playground/api/evaluate')
      .set('authorization', `Bearer ${token}`)
      .send(body as object);

  describe('authentication', () => {
    const refused: Array<[string, () => string | undefined, number, string]> = [
      ['no Authorization header', () => undefined, 401, 'invalid_token'],
      ['a Basic credential', () => 'Basic dXNlcjpwYXNz', 401, 'invalid_token'],
      [
        'an unknown bearer token',
        () => 'Bearer ccds_not-a-real-token-0123456789',
        401,
        'invalid_token',
      ],
      ['a bearer token with extra parts', () => `Bearer ${ruleAuthor} extra`, 401, 'invalid_token'],
      ['a tenant-admin token', () => `Bearer ${tenantAdmin}`, 403, 'forbidden'],
      ['an auditor token', () => `Bearer ${auditor}`, 403, 'forbidden'],
    ];
    for (const [name, header, status, code] of refused) {
      it(`refuses ${name} with ${status} ${code}`, async () => {
        const h = header();
        const req = request(u.handler).get('/playground/api/packs');
        const res = await (h === undefined ? req : req.set('authorization', h));
        expect(res.status).to.equal(status);
        expect(res.body.error).to.equal(code);
        if (status === 401) {
          expect(res.headers['www-authenticate']).to.equal('Bearer');
        }
      });
    }

    it('audits a refused playground access (admin.forbidden: actor, action, endpoint, request id)', async () => {
      const res = await request(u.handler)
        .get('/playground/api/packs')
        .set('authorization', `Bearer ${auditor}`);
      expect(res.status).to.equal(403);
      const requestId = res.headers['x-request-id'] as string;
      const events = await u.t.deps.controlPlane.audit.list({ type: 'admin.forbidden' });
      const event = events.find((e) => e.detail?.requestId === requestId);
      expect(event?.actor).to.match(/^auditor:tok_/);
      expect(event?.detail).to.deep.include({
        reason: 'pack:read',
        actorTenant: 'tenant-a',
        method: 'GET',
        endpoint: 'playground',
      });
    });

    it('lets a rule author and the bootstrap operator list packs and patients', async () => {
      for (const token of [ruleAuthor, u.t.adminToken]) {
        const packs = await request(u.handler)
          .get('/playground/api/packs')
          .set('authorization', `Bearer ${token}`);
        expect(packs.status).to.equal(200);
        expect(packs.body.packs.map((p: { id: string }) => p.id)).to.deep.equal([
          'medication-safety',
          'tiny',
        ]);
        const patients = await request(u.handler)
          .get('/playground/api/patients')
          .set('authorization', `Bearer ${token}`);
        expect(patients.body.patients).to.have.length(53);
        const kyla = patients.body.patients.find((p: { file: string }) => p.file === KYLA);
        expect(kyla).to.include({
          name: 'Kyla Zulauf',
          gender: 'female',
          age: 80,
          lastEncounter: '2021-01-17',
        });
      }
    });
  });

  it('evaluates the shipped order-sign service for a warfarin patient with an NSAID draft', async () => {
    const before = dataFiles(u.t.dataDir);
    const res = await evaluate(ruleAuthor, {
      pack: 'medication-safety',
      version: shippedPackVersion(),
      service: 'medication-safety-order-sign',
      patient: { fixture: KYLA },
      draftOrders: [IBUPROFEN],
      now: '2021-01-17T23:59:59Z',
    });
    expect(res.status, JSON.stringify(res.body)).to.equal(200);
    const { cards } = res.body.response;
    const summaries = cards.map((c: { summary: string }) => c.summary);
    expect(summaries.some((s: string) => s.startsWith('Warfarin + Ibuprofen'))).to.equal(true);
    expect(cards.some((c: { indicator: string }) => c.indicator === 'critical')).to.equal(true);
    const fired = res.body.trace
      .filter((t: { fired: boolean }) => t.fired)
      .map((t: { ruleId: string }) => t.ruleId);
    expect(fired).to.include.members([
      'warfarin-nsaid',
      'warfarin-nsaid-no-gi-protection',
      'warfarin-nsaid-gi-bleed-risk',
    ]);
    // Every rule of the service is traced, with a duration and its condition for the "why".
    const ruleIds = res.body.rules.map((r: { id: string }) => r.id);
    expect(res.body.trace.map((t: { ruleId: string }) => t.ruleId).sort()).to.deep.equal(
      [...ruleIds].sort(),
    );
    expect(res.body.trace.every((t: { durationMs: number }) => t.durationMs >= 0)).to.equal(true);
    expect(res.body.rules[0].when).to.be.a('string');
    // The exact request an EHR would send: hook, hookInstance, context with the draft, prefetch.
    expect(res.body.request.hook).to.equal('order-sign');
    expect(res.body.request.context.draftOrders.entry[0].resource.id).to.equal('draft-1');
    expect(res.body.request.prefetch.patient.resourceType).to.equal('Patient');
    expect(res.body.now).to.equal('2021-01-17T23:59:59.000Z');
    // Nothing stored per tenant; one PHI-free audit event in the control plane.
    expect(dataFiles(u.t.dataDir)).to.deep.equal(before);
    const events = await u.t.deps.controlPlane.audit.list({ type: 'playground.evaluate' });
    // The actor as every other admin event names it: role:tokenId.
    expect(events.at(-1)?.actor).to.match(/^(platform-operator|rule-author):/);
    expect(events.at(-1)?.detail).to.deep.include({
      pack: 'medication-safety',
      patient: 'fixture',
      service: 'medication-safety-order-sign',
    });
    expect(JSON.stringify(events)).to.not.include('Kyla');
  });

  it('evaluates an uploaded Bundle on a patient-view service', async () => {
    const bundle = JSON.parse(
      fs.readFileSync(
        path.join(import.meta.dirname, '..', 'fixtures', 'synthea-r4', MAFALDA),
        'utf8',
      ),
    );
    const res = await evaluate(ruleAuthor, {
      pack: 'medication-safety',
      version: shippedPackVersion(),
      service: 'medication-safety-patient-view',
      patient: { bundle },
    });
    expect(res.status, JSON.stringify(res.body)).to.equal(200);
    expect(res.body.request.context).to.not.have.property('draftOrders');
    expect(res.body.response.cards.map((c: { summary: string }) => c.summary).join('\n')).to.match(
      /Warfarin \+ Naproxen/,
    );
  });

  describe('a date-only now, read as a pack test reads it', () => {
    // A draft authored at 10:00 UTC on the day given: after 00:00 UTC of that day, so a rule
    // asking "authored by now?" must not fire for a date-only now, in a test or the playground.
    const AUTHORED = '2021-03-01T10:00:00Z';
    const draft = { ...IBUPROFEN, authoredOn: AUTHORED };
    const boundaryPack = (): Record<string, unknown> => ({
      id: 'boundary',
      version: '1.0.0',
      title: 'Boundary',
      publisher: 'cellcds specs',
      description: 'Reads %now against a draft authored during the day.',
      services: [
        { id: 'boundary-order-sign', hook: 'order-sign', description: 'Compares with %now.' },
      ],
      rules: [
        {
          id: 'authored-by-now',
          service: 'boundary-order-sign',
          when: '%draftOrders.entry.resource.ofType(MedicationRequest).where(authoredOn <= %now).exists()',
          card: {
            summary: 'Authored by now',
            indicator: 'info',
            source: { label: 'cellcds specs' },
          },
        },
      ],
      // The reference: an upload runs these and refuses the pack if one fails.
      tests: [
        ['2021-03-01', 'notFire'],
        ['2021-03-02', 'fire'],
      ].map(([now, expected]) => ({
        name: `now ${now}`,
        service: 'boundary-order-sign',
        now,
        request: {
          hook: 'order-sign',
          context: {
            userId: 'Practitioner/p1',
            patientId: 'p1',
            draftOrders: {
              resourceType: 'Bundle',
              type: 'collection',
              entry: [
                { resource: { ...draft, id: 'draft-1', subject: { reference: 'Patient/p1' } } },
              ],
            },
          },
        },
        expect: { [expected as string]: ['authored-by-now'] },
      })),
    });

    before(async () => {
      const res = await u.t.uploadPack(boundaryPack());
      expect(res.status, JSON.stringify(res.body)).to.equal(201);
    });

    const firedAt = async (now: string): Promise<{ fired: boolean; now: string }> => {
      const res = await evaluate(ruleAuthor, {
        pack: 'boundary',
        version: '1.0.0',
        service: 'boundary-order-sign',
        patient: { fixture: KYLA },
        draftOrders: [draft],
        now,
      });
      expect(res.status, JSON.stringify(res.body)).to.equal(200);
      const trace = res.body.trace as Array<{ ruleId: string; fired: boolean }>;
      return {
        fired: trace.find((t) => t.ruleId === 'authored-by-now')?.fired === true,
        now: res.body.now as string,
      };
    };

    it('accepts a date only and reads it as 00:00 UTC of that day, as the pack test did', async () => {
      expect(await firedAt('2021-03-01')).to.deep.equal({
        fired: false,
        now: '2021-03-01T00:00:00.000Z',
      });
      expect(await firedAt('2021-03-02')).to.deep.equal({
        fired: true,
        now: '2021-03-02T00:00:00.000Z',
      });
    });

    it('still reads a dateTime with its offset as that instant', async () => {
      expect(await firedAt('2021-03-01T12:00:00+01:00')).to.deep.equal({
        fired: true,
        now: '2021-03-01T11:00:00.000Z',
      });
    });

    it('refuses a time without an offset with the message a pack test gets', async () => {
      const res = await evaluate(ruleAuthor, {
        pack: 'boundary',
        version: '1.0.0',
        service: 'boundary-order-sign',
        patient: { fixture: KYLA },
        now: '2021-03-01T10:00',
      });
      expect(res.status).to.equal(400);
      expect(res.body.error).to.equal('invalid_request');
      expect(res.body.message).to.equal(
        'now: a time needs an offset (Z or +hh:mm), e.g. 2021-03-01T23:00:00Z; or give a date only',
      );
    });
  });

  const bad: Array<[string, Record<string, unknown>, number, string]> = [
    [
      'an unknown pack',
      { pack: 'nope', version: '1.0.0', service: 'x', patient: { fixture: KYLA } },
      404,
      'not_found',
    ],
    [
      'an unknown version',
      { pack: 'tiny', version: '9.9.9', service: 'tiny-order-sign', patient: { fixture: KYLA } },
      404,
      'not_found',
    ],
    [
      'an unknown service',
      { pack: 'tiny', version: '1.0.0', service: 'nope', patient: { fixture: KYLA } },
      404,
      'not_found',
    ],
    [
      'a fixture name that is a path',
      {
        pack: 'tiny',
        version: '1.0.0',
        service: 'tiny-patient-view',
        patient: { fixture: '../../package.json' },
      },
      400,
      'invalid_request',
    ],
    [
      'a Bundle with no Patient',
      {
        pack: 'tiny',
        version: '1.0.0',
        service: 'tiny-patient-view',
        patient: { bundle: { resourceType: 'Bundle', type: 'collection', entry: [] } },
      },
      400,
      'invalid_request',
    ],
    [
      'a Bundle with two Patients',
      {
        pack: 'tiny',
        version: '1.0.0',
        service: 'tiny-patient-view',
        patient: {
          bundle: {
            resourceType: 'Bundle',
            entry: [
              { resource: { resourceType: 'Patient', id: 'a' } },
              { resource: { resourceType: 'Patient', id: 'b' } },
            ],
          },
        },
      },
      400,
      'invalid_request',
    ],
    [
      'a patient that is neither fixture nor bundle',
      { pack: 'tiny', version: '1.0.0', service: 'tiny-patient-view', patient: {} },
      400,
      'invalid_request',
    ],
    [
      'draft orders that are not resources',
      {
        pack: 'tiny',
        version: '1.0.0',
        service: 'tiny-order-sign',
        patient: { fixture: KYLA },
        draftOrders: [{ status: 'draft' }],
      },
      400,
      'invalid_request',
    ],
    [
      'a malformed now',
      {
        pack: 'tiny',
        version: '1.0.0',
        service: 'tiny-order-sign',
        patient: { fixture: KYLA },
        now: 'yesterday',
      },
      400,
      'invalid_request',
    ],
    [
      'a now with a time but no offset',
      {
        pack: 'tiny',
        version: '1.0.0',
        service: 'tiny-order-sign',
        patient: { fixture: KYLA },
        now: '2021-03-01T10:00',
      },
      400,
      'invalid_request',
    ],
    [
      'an unknown field',
      {
        pack: 'tiny',
        version: '1.0.0',
        service: 'tiny-order-sign',
        patient: { fixture: KYLA },
        store: true,
      },
      400,
      'invalid_request',
    ],
  ];
  for (const [name, body, status, code] of bad) {
    it(`refuses ${name} with ${status} ${code}`, async () => {
      const res = await evaluate(ruleAuthor, body);
      expect(res.status, JSON.stringify(res.body)).to.equal(status);
      expect(res.body.error).to.equal(code);
    });
  }

  it('refuses a __proto__ key and a non-JSON body', async () => {
    const proto = await request(u.handler)
      .post('/playground/api/evaluate')
      .set('authorization', `Bearer ${ruleAuthor}`)
      .set('content-type', 'application/json')
      .send(
        '{"pack":"tiny","version":"1.0.0","service":"tiny-order-sign","patient":{"fixture":"x"},"__proto__":{"admin":true}}',
      );
    expect(proto.status).to.equal(400);
    expect(proto.body.error).to.equal('invalid_request');
    const text = await request(u.handler)
      .post('/playground/api/evaluate')
      .set('authorization', `Bearer ${ruleAuthor}`)
      .set('content-type', 'text/plain')
      .send('hello');
    expect(text.status).to.equal(415);
  });

  it('validates playground feedback and stores nothing', async () => {
    const ok = await request(u.handler)
      .post('/playground/api/feedback')
      .set('authorization', `Bearer ${ruleAuthor}`)
      .send({
        service: 'tiny-order-sign',
        feedback: [
          {
            card: 'c1',
            outcome: 'accepted',
            acceptedSuggestions: [{ id: 's1' }],
            outcomeTimestamp: '2025-01-01T00:00:00Z',
          },
        ],
      });
    expect(ok.status).to.equal(200);
    expect(ok.body.stored).to.equal(false);
    const badItem = await request(u.handler)
      .post('/playground/api/feedback')
      .set('authorization', `Bearer ${ruleAuthor}`)
      .send({
        service: 'tiny-order-sign',
        feedback: [{ card: 'c1', outcome: 'accepted', outcomeTimestamp: '2025-01-01T00:00:00Z' }],
      });
    expect(badItem.status).to.equal(400);
    expect(badItem.body.field).to.equal('feedback[0].acceptedSuggestions');
  });
});

describe('card viewer: SMART app API fails closed', () => {
  let u: UiApp;
  let unconfigured: UiApp;
  let fhir: TestFhirServer;
  let ehr: TestIssuer;
  let stranger: TestIssuer;
  const received: Array<{ tenant: string; service: string; items: FeedbackItem[] }> = [];

  before(async () => {
    fhir = await startFhirServer({ patientFile: MAFALDA, token: 'smart-access-token-0123456789' });
    u = await startUiApp({
      smartClientId: CLIENT_ID,
      onFeedback: (tenant, service, items) => {
        received.push({ tenant, service, items });
      },
    });
    expect((await u.t.uploadPack(shippedPackRaw())).status).to.equal(201);
    ehr = await TestIssuer.create({ iss: 'https://auth.ehr-a.test.example', alg: 'RS256' });
    stranger = await TestIssuer.create({ iss: 'https://auth.stranger.test.example' });
    await u.t.addTenant('hospital-a', {
      issuer: ehr,
      fhirServers: [fhir.baseUrl],
      subscriptions: [{ pack: 'medication-safety', version: shippedPackVersion() }],
    });
    await u.t.addTenant('hospital-b', { fhirServers: ['https://fhir.hospital-b.test.example/r4'] });
    unconfigured = await startUiApp();
    expect((await unconfigured.t.uploadPack(shippedPackRaw())).status).to.equal(201);
    await unconfigured.t.addTenant('hospital-a', {
      issuer: ehr,
      fhirServers: [fhir.baseUrl],
      subscriptions: [{ pack: 'medication-safety', version: shippedPackVersion() }],
    });
  });
  after(async () => {
    await u.close();
    await unconfigured.close();
    await fhir.close();
  });

  const fhirUser = () => `${fhir.baseUrl}/Practitioner/practitioner-1`;
  const goodClaims = () => ({ aud: CLIENT_ID, sub: 'user-1', fhirUser: fhirUser() });
  const callBody = (overrides: Record<string, unknown> = {}) => ({
    fhirServer: fhir.baseUrl,
    fhirAuthorization: {
      access_token: fhir.token,
      token_type: 'Bearer',
      expires_in: 3600,
      scope: 'launch openid fhirUser patient/*.read',
      patient: fhir.record.patientId,
    },
    context: { patientId: fhir.record.patientId },
    ...overrides,
  });
  const call = (app: UiApp, authorization: string | undefined, body: unknown = callBody()) => {
    const req = request(app.handler).post('/app/api/patient-view');
    return (authorization === undefined ? req : req.set('authorization', authorization)).send(
      body as object,
    );
  };

  it('serves the launch page only for an iss some tenant allowlists (no open redirect to any sign-in page)', async () => {
    const launch = (iss: string) =>
      request(u.handler).get(`/app/launch?iss=${encodeURIComponent(iss)}&launch=abc`);
    const known = await launch(fhir.baseUrl);
    expect(known.status).to.equal(200);
    expect(known.text).to.include('launch.mjs');
    // Trailing slash: the same base in normal form.
    expect((await launch(`${fhir.baseUrl}/`)).status).to.equal(200);
    for (const iss of [
      'https://evil.example/fhir',
      `${fhir.baseUrl}-evil`,
      'javascript:alert(1)',
      'not a url',
    ]) {
      const res = await launch(iss);
      expect(res.status, iss).to.equal(400);
      expect(res.text, iss).to.not.include('launch.mjs');
      expect(res.text, iss).to.not.include(iss); // no echo
      expect(String(res.headers['content-security-policy'])).to.include("script-src 'self'");
    }
    // Repeated iss parameters are not a string: refused too.
    expect(
      (await request(u.handler).get(`/app/launch?iss=${encodeURIComponent(fhir.baseUrl)}&iss=x`))
        .status,
    ).to.equal(400);
    // The answer is kept per control-plane generation: a suspension refuses the next launch.
    await u.t.deps.controlPlane.tenants.update('hospital-a', { status: 'suspended' });
    try {
      expect((await launch(fhir.baseUrl)).status).to.equal(400);
    } finally {
      await u.t.deps.controlPlane.tenants.update('hospital-a', { status: 'active' });
    }
    expect((await launch(fhir.baseUrl)).status).to.equal(200);
  });

  it('runs the tenant patient-view services with prefetch fetched by the access token', async () => {
    const before = fhir.requests.length;
    const res = await call(u, `Bearer ${await ehr.sign(goodClaims())}`);
    expect(res.status, JSON.stringify(res.body)).to.equal(200);
    expect(res.body.tenant).to.equal('hospital-a');
    expect(res.body.services).to.have.length(1);
    const [service] = res.body.services;
    expect(service.id).to.equal('medication-safety-patient-view');
    expect(service.cards.map((c: { summary: string }) => c.summary).join('\n')).to.match(
      /Warfarin \+ Naproxen/,
    );
    const made = fhir.requests.slice(before);
    expect(made.length).to.be.greaterThan(0);
    expect(made.every((r) => r.authorization === `Bearer ${fhir.token}`)).to.equal(true);
    const log = u.t.logLines.join('\n');
    expect(log).to.include('app patient-view');
    expect(log).to.not.include(fhir.token);
    expect(log).to.not.include(fhir.record.patientId);
  });

  const attacks: Array<
    [string, string, () => Promise<string | undefined>, Record<string, unknown>?]
  > = [
    ['no Authorization header', 'missing', () => Promise.resolve(undefined)],
    ['a Basic credential', 'malformed', () => Promise.resolve('Basic dXNlcjpwYXNz')],
    [
      'an unsigned token (alg none)',
      'malformed',
      () => Promise.resolve(`Bearer ${ehr.unsigned(goodClaims())}`),
    ],
    [
      'HS256 signed with the public key',
      'bad_alg',
      () => Promise.resolve(`Bearer ${ehr.hs256WithPublicKey(goodClaims())}`),
    ],
    [
      'a foreign key claiming the issuer kid',
      'bad_signature',
      async () => `Bearer ${await ehr.signWithForeignKey(goodClaims(), { alg: 'RS256' })}`,
    ],
    [
      'an issuer no tenant registered',
      'unknown_issuer',
      async () => `Bearer ${await stranger.sign(goodClaims())}`,
    ],
    [
      'aud naming another client',
      'bad_aud',
      async () => `Bearer ${await ehr.sign({ ...goodClaims(), aud: 'another-app' })}`,
    ],
    [
      'aud naming this endpoint instead of the client',
      'bad_aud',
      async () =>
        `Bearer ${await ehr.sign({ ...goodClaims(), aud: `${u.base}/app/api/patient-view` })}`,
    ],
    [
      'several audiences without azp',
      'bad_aud',
      async () => `Bearer ${await ehr.sign({ ...goodClaims(), aud: [CLIENT_ID, 'other'] })}`,
    ],
    [
      'azp naming another client',
      'bad_aud',
      async () => `Bearer ${await ehr.sign({ ...goodClaims(), azp: 'another-app' })}`,
    ],
    [
      'an expired token',
      'expired',
      async () =>
        `Bearer ${await ehr.sign({ ...goodClaims(), iat: Math.floor(Date.now() / 1000) - 900, exp: Math.floor(Date.now() / 1000) - 600 })}`,
    ],
    [
      'a token issued in the future',
      'future_iat',
      async () =>
        `Bearer ${await ehr.sign({ ...goodClaims(), iat: Math.floor(Date.now() / 1000) + 600, exp: Math.floor(Date.now() / 1000) + 900 })}`,
    ],
    [
      'a lifetime over the maximum',
      'lifetime',
      async () =>
        `Bearer ${await ehr.sign({ ...goodClaims(), exp: Math.floor(Date.now() / 1000) + 86400 })}`,
    ],
    [
      'no sub',
      'missing_claim',
      async () => `Bearer ${await ehr.sign({ ...goodClaims(), sub: undefined })}`,
    ],
    [
      'no fhirUser',
      'missing_claim',
      async () => `Bearer ${await ehr.sign({ ...goodClaims(), fhirUser: undefined })}`,
    ],
    [
      'a fhirUser that is an Organization',
      'missing_claim',
      async () =>
        `Bearer ${await ehr.sign({ ...goodClaims(), fhirUser: `${fhir.baseUrl}/Organization/o1` })}`,
    ],
    [
      'an access token (typ at+jwt)',
      'bad_typ',
      async () => `Bearer ${await ehr.sign(goodClaims(), { typ: 'at+jwt' })}`,
    ],
    [
      'a jku header',
      'bad_jku',
      async () =>
        `Bearer ${await ehr.sign(goodClaims(), { jku: 'https://attacker.test.example/jwks' })}`,
    ],
    [
      'a FHIR server outside the allowlist',
      'bad_tenant',
      async () => `Bearer ${await ehr.sign(goodClaims())}`,
      { fhirServer: 'https://attacker.test.example/fhir' },
    ],
    [
      "another tenant's id as the tenant hint",
      'bad_tenant',
      async () => `Bearer ${await ehr.sign(goodClaims())}`,
      { tenant: 'hospital-b' },
    ],
  ];
  for (const [name, reason, make, overrides] of attacks) {
    it(`refuses ${name} (${reason}) with 401 before any FHIR request`, async () => {
      const before = fhir.requests.length;
      const auditBefore = (await u.t.deps.controlPlane.audit.list({ type: 'auth.failure' })).length;
      const res = await call(u, await make(), callBody(overrides));
      expect(res.status, JSON.stringify(res.body)).to.equal(401);
      expect(res.body).to.deep.equal({ error: 'invalid_token', message: 'invalid token' });
      expect(res.headers['www-authenticate']).to.equal('Bearer');
      expect(fhir.requests.length).to.equal(before);
      const audit = await u.t.deps.controlPlane.audit.list({ type: 'auth.failure' });
      expect(audit.length).to.equal(auditBefore + 1);
      expect(audit.at(-1)?.detail).to.deep.include({ endpoint: '/app/api/patient-view', reason });
    });
  }

  it('refuses a suspended tenant', async () => {
    await u.t.deps.controlPlane.tenants.update('hospital-a', { status: 'suspended' });
    try {
      const res = await call(u, `Bearer ${await ehr.sign(goodClaims())}`);
      expect(res.status).to.equal(401);
    } finally {
      await u.t.deps.controlPlane.tenants.update('hospital-a', { status: 'active' });
    }
  });

  it('refuses a tenant this region may not serve with 421, before any FHIR request', async () => {
    // The same app acting as the plane of a region that is not hospital-a's home.
    const home = u.t.deps.region;
    u.t.deps.region = { ...home, id: 'other-region' };
    try {
      const before = fhir.requests.length;
      const res = await call(u, `Bearer ${await ehr.sign(goodClaims())}`);
      expect(res.status).to.equal(421);
      expect(res.body.error).to.equal('misdirected');
      expect(fhir.requests.length).to.equal(before);
      const audit = await u.t.deps.controlPlane.audit.list({ type: 'residency.misdirected' });
      expect(audit.at(-1)?.detail).to.deep.include({
        endpoint: '/app/api/patient-view',
        region: 'other-region',
      });
    } finally {
      u.t.deps.region = home;
    }
  });

  it('refuses every call when no client id is configured', async () => {
    const before = fhir.requests.length;
    const res = await call(unconfigured, `Bearer ${await ehr.sign(goodClaims())}`);
    expect(res.status).to.equal(401);
    expect(fhir.requests.length).to.equal(before);
  });

  it('authenticates before it validates the body: a bad body with a forged token is 401', async () => {
    const res = await call(u, `Bearer ${await stranger.sign(goodClaims())}`, {
      fhirServer: fhir.baseUrl,
      context: { patientId: '../../etc' },
      extra: true,
    });
    expect(res.status).to.equal(401);
  });

  it('refuses a patient other than the launch patient', async () => {
    const body = callBody({ context: { patientId: 'someone-else' } });
    const res = await call(u, `Bearer ${await ehr.sign(goodClaims())}`, body);
    expect(res.status).to.equal(400);
    expect(res.body.field).to.equal('context.patientId');
  });

  it('refuses bad bodies with 400 naming the field', async () => {
    const token = `Bearer ${await ehr.sign(goodClaims())}`;
    const cases: Array<[unknown, string]> = [
      [{ ...callBody(), fhirAuthorization: undefined }, 'fhirAuthorization'],
      [{ ...callBody(), prefetch: { patient: {} } }, 'body'],
      [
        callBody({ context: { patientId: fhir.record.patientId, userId: 'Practitioner/x' } }),
        'context',
      ],
    ];
    for (const [body, field] of cases) {
      const res = await call(u, token, body);
      expect(res.status, JSON.stringify(res.body)).to.equal(400);
      expect(String(res.body.field)).to.include(field);
    }
  });

  it('passes valid feedback to onFeedback for the tenant and refuses the rest', async () => {
    const token = `Bearer ${await ehr.sign(goodClaims())}`;
    const item = {
      card: 'card-1',
      outcome: 'overridden',
      overrideReason: { userComment: 'reviewed' },
      outcomeTimestamp: '2025-03-01T10:00:00Z',
    };
    const ok = await request(u.handler)
      .post('/app/api/feedback')
      .set('authorization', token)
      .send({
        fhirServer: fhir.baseUrl,
        service: 'medication-safety-patient-view',
        feedback: [item],
      });
    expect(ok.status, JSON.stringify(ok.body)).to.equal(200);
    expect(received.at(-1)).to.deep.equal({
      tenant: 'hospital-a',
      service: 'medication-safety-patient-view',
      items: [item],
    });
    const count = received.length;
    const orderSign = await request(u.handler)
      .post('/app/api/feedback')
      .set('authorization', token)
      .send({
        fhirServer: fhir.baseUrl,
        service: 'medication-safety-order-sign',
        feedback: [item],
      });
    expect(orderSign.status).to.equal(404);
    const forged = await request(u.handler)
      .post('/app/api/feedback')
      .set('authorization', `Bearer ${await stranger.sign(goodClaims())}`)
      .send({
        fhirServer: fhir.baseUrl,
        service: 'medication-safety-patient-view',
        feedback: [item],
      });
    expect(forged.status).to.equal(401);
    const invalid = await request(u.handler)
      .post('/app/api/feedback')
      .set('authorization', token)
      .send({
        fhirServer: fhir.baseUrl,
        service: 'medication-safety-patient-view',
        feedback: [{ ...item, outcome: 'ignored' }],
      });
    expect(invalid.status).to.equal(400);
    expect(received.length).to.equal(count);
  });
});
