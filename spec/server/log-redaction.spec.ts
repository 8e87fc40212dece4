import crypto from 'node:crypto';
import { expect } from 'chai';
import request from 'supertest';
import fc from 'fast-check';
import {
  createLogger,
  sanitizeForLog,
  scrubSecrets,
  scrubText,
  serializeError,
} from '../../server/logger.ts';
import { buildTestApp, PUBLIC_URL, type TestApp } from '../helpers/test-app.ts';
import { patientViewRequest, tinyPack, warfarinNsaidRequest } from '../helpers/packs.ts';
import type { TestIssuer } from '../helpers/test-issuer.ts';

/** Planted PHI and secrets: none of these may appear in any log line. */
const NAME = 'Zebediah Quixotewright';
const FAMILY = 'Quixotewright';
const MRN = 'MRN-77341982';
const MRN_DIGITS = '77341982';
const BIRTH_DATE = '1937-04-12';
const EMAIL = 'zeb.quixote@example.org';
const JWT =
  'eyJhbGciOiJFUzM4NCIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJaZWJlZGlhaCIsInRlbmFudCI6InBsYW50ZWQifQ.c2lnbmF0dXJlLXBsYW50ZWQtdmFsdWU';
const JWT_SIGNATURE = 'c2lnbmF0dXJlLXBsYW50ZWQtdmFsdWU';
const OPERATOR_TOKEN = 'ccds_op_PlantedOperatorToken0123456789abcdef';
const OPAQUE_ACCESS_TOKEN = 'planted-opaque-access-token-5f1e';

const PLANTED = [
  NAME,
  FAMILY,
  MRN,
  MRN_DIGITS,
  BIRTH_DATE,
  EMAIL,
  JWT,
  JWT_SIGNATURE,
  OPERATOR_TOKEN,
  OPAQUE_ACCESS_TOKEN,
];

function assertNoPlanted(lines: readonly string[], extra: readonly string[] = []): void {
  expect(lines.length, 'some lines were logged').to.be.greaterThan(0);
  for (const line of lines) {
    expect(() => JSON.parse(line) as unknown, line).not.to.throw();
    for (const marker of [...PLANTED, ...extra]) {
      expect(line, `planted value ${marker} leaked`).not.to.include(marker);
    }
  }
}

const patientResource = () => ({
  resourceType: 'Patient',
  id: 'pat-1',
  name: [{ text: NAME, family: FAMILY, given: ['Zebediah'] }],
  identifier: [{ system: 'urn:mrn', value: MRN }],
  birthDate: BIRTH_DATE,
  telecom: [{ system: 'email', value: EMAIL }],
});

describe('server/ log redaction', () => {
  describe('every logging path of the logger', () => {
    let lines: string[];
    const logger = () =>
      createLogger({
        level: 'trace',
        base: { region: 'eu-west' },
        destination: {
          write: (line: string) => {
            lines.push(line);
          },
        },
      });

    beforeEach(() => {
      lines = [];
    });

    it('censors sensitive keys at the top level and one level down (pino paths)', () => {
      logger().info(
        {
          body: { patient: NAME },
          context: { patientId: MRN },
          prefetch: { patient: patientResource() },
          authorization: `Bearer ${JWT}`,
          token: OPERATOR_TOKEN,
          cards: [{ summary: `Check ${NAME}` }],
          summary: NAME,
          detail: `MRN ${MRN}`,
          fhirAuthorization: { access_token: OPAQUE_ACCESS_TOKEN },
          headers: { authorization: `Bearer ${JWT}` },
        },
        'top level',
      );
      assertNoPlanted(lines);
      const line = JSON.parse(lines[0]!);
      expect(line.body).to.equal('[redacted]');
      expect(line.headers.authorization).to.equal('[redacted]');
    });

    it('censors sensitive keys at any depth, in arrays, maps and sets', () => {
      logger().warn(
        {
          outer: { a: { b: { c: { patient: patientResource(), note: 'fine' } } } },
          items: [{ resource: patientResource() }, { entry: [{ resource: patientResource() }] }],
          upstream: { request: { headers: { Authorization: `Bearer ${JWT}` } } },
          byKey: new Map<string, unknown>([
            ['Access-Token', OPAQUE_ACCESS_TOKEN],
            ['birth_date', BIRTH_DATE],
          ]),
          set: new Set([{ identifier: MRN }]),
          cfg: { client_assertion: JWT, password: OPAQUE_ACCESS_TOKEN, apiKey: OPERATOR_TOKEN },
        },
        'nested',
      );
      assertNoPlanted(lines);
      const line = JSON.parse(lines[0]!);
      expect(line.outer.a.b.c).to.deep.equal({ patient: '[redacted]', note: 'fine' });
      expect(line.items[0].resource).to.equal('[redacted]');
    });

    it('scrubs tokens out of any string value, and cuts cycles', () => {
      const loop: Record<string, unknown> = {
        url: `https://fhir.example/Patient?access_token=${JWT}`,
      };
      loop.self = loop;
      logger().info(
        {
          loop,
          note: `called with Bearer ${OPAQUE_ACCESS_TOKEN}`,
          header: `Basic ${Buffer.from(`${FAMILY}:pw`).toString('base64')}`,
          opToken: `used ${OPERATOR_TOKEN} to log in`,
        },
        'strings',
      );
      assertNoPlanted(lines, [Buffer.from(`${FAMILY}:pw`).toString('base64')]);
      expect(JSON.parse(lines[0]!).loop.self).to.equal('[circular]');
    });

    it('redacts child and grandchild bindings the same way', () => {
      const child = logger().child({
        requestId: 'req-1',
        tenant: 'eu-hospital',
        body: { name: NAME },
        upstream: { patient: { identifier: MRN } },
        auth: `Bearer ${JWT}`,
      });
      const grandchild = child.child({
        deeper: { x: { resource: patientResource() } },
        email: EMAIL,
      });
      child.info('child line');
      grandchild.error({ more: { context: { patientId: MRN } } }, 'grandchild line');
      assertNoPlanted(lines);
      const last = JSON.parse(lines[1]!);
      expect(last).to.include({ requestId: 'req-1', tenant: 'eu-hospital', region: 'eu-west' });
    });

    it('serializes errors with PHI in the message and stack: type and frames kept, values gone', () => {
      const err = new Error(
        `no match for "${NAME}" (${MRN}, born ${BIRTH_DATE}, ${EMAIL}) with Bearer ${JWT}`,
      );
      Object.assign(err, {
        code: 'E_LOOKUP',
        status: 502,
        body: { patient: patientResource() },
        config: { headers: { Authorization: `Bearer ${JWT}` } },
        response: { data: NAME },
        hint: `${FAMILY} ${MRN}`,
      });
      const log = logger();
      log.error({ err, requestId: 'req-2' }, 'failed');
      log.error(err);
      log.error({ err });
      const line = JSON.parse(lines[0]!);
      expect(line.err.type).to.equal('Error');
      expect(line.err.code).to.equal('E_LOOKUP');
      expect(line.err.status).to.equal(502);
      expect(line.err.message).to.equal(
        'no match for [redacted] (MRN-[redacted], born [redacted], [redacted]) with Bearer [redacted]',
      );
      expect(line.err.stack.split('\n')[0]).to.equal(`Error: ${line.err.message}`);
      expect(line.err.stack).to.match(/\n\s+at /);
      expect(line.err).not.to.have.any.keys('body', 'config', 'response', 'hint');
      // An error as the only argument becomes the message: scrubbed too.
      expect(JSON.parse(lines[1]!).msg).to.equal(line.err.message);
      expect(JSON.parse(lines[2]!).msg).to.equal(line.err.message);
      assertNoPlanted(lines);
    });

    it('scrubs real third-party errors that quote their input, and the cause chain', () => {
      let parseError: unknown;
      try {
        JSON.parse(`${FAMILY} ${MRN_DIGITS}`);
      } catch (e) {
        parseError = e;
      }
      const wrapped = new Error('request failed', { cause: parseError });
      const many = new AggregateError(
        [new TypeError(`Cannot read '${NAME}'`), new RangeError(`${MRN_DIGITS} out of range`)],
        'several',
      );
      const log = logger();
      log.error({ err: wrapped }, 'wrapped');
      log.error({ err: many }, 'aggregate');
      // An error under another key, and an error already flattened by a caller.
      log.warn({ failure: parseError, requestId: 'r' }, 'other key');
      log.error(
        {
          err: {
            type: 'SyntaxError',
            message: `Unexpected token "${NAME}"`,
            stack: `SyntaxError: "${NAME}"\n    at x (file.ts:1:1)`,
          },
        },
        'flattened',
      );
      assertNoPlanted(lines);
      expect(JSON.parse(lines[0]!).err.cause.type).to.equal('SyntaxError');
      expect(JSON.parse(lines[1]!).err.errors).to.have.length(2);
      expect(JSON.parse(lines[3]!).err.stack).to.equal(
        'SyntaxError: Unexpected token [redacted]\n    at x (file.ts:1:1)',
      );
    });

    it('scrubs message strings and censors interpolated string arguments', () => {
      const log = logger();
      log.info(`token ${JWT} used for ${EMAIL}`);
      log.info('patient %s has MRN %s (%d visits)', NAME, MRN, 3);
      log.info({ requestId: 'r' }, 'lookup of %s', FAMILY);
      assertNoPlanted(lines);
      expect(JSON.parse(lines[1]!).msg).to.equal(
        'patient [redacted] has MRN [redacted] (3 visits)',
      );
    });

    it('keeps the operational fields: ids, counts, routes, statuses', () => {
      logger().child({ requestId: 'req-9', tenant: 'us-clinic' }).info(
        {
          service: 'tiny-order-sign',
          hook: 'order-sign',
          cardCount: 2,
          ms: 12,
          status: 200,
          route: '/cds-services/:id',
        },
        'hook call',
      );
      expect(JSON.parse(lines[0]!)).to.include({
        level: 'info',
        app: 'cellcds',
        region: 'eu-west',
        requestId: 'req-9',
        tenant: 'us-clinic',
        service: 'tiny-order-sign',
        hook: 'order-sign',
        cardCount: 2,
        ms: 12,
        status: 200,
        route: '/cds-services/:id',
        msg: 'hook call',
      });
    });

    it('exposes the scrubbers for other sinks', () => {
      expect(scrubText(`"${NAME}" ${MRN} ${JWT}`)).to.equal('[redacted] MRN-[redacted] [redacted]');
      expect(JSON.stringify(sanitizeForLog({ context: NAME, n: 1 }))).to.equal(
        '{"context":"[redacted]","n":1}',
      );
      expect(serializeError('not an error')).to.deep.equal({ type: 'string' });
    });

    it('scrubs exactly what the patterns alone would: the literal pre-check skips no match (property)', () => {
      // The patterns as they were before each got a literal that every match contains.
      const patterns = [
        /eyJ[A-Za-z0-9_-]{2,}(?:\.[A-Za-z0-9_-]*){1,4}/g,
        /\b(?:Bearer|Basic|DPoP)\s+[A-Za-z0-9._~+/=-]+/gi,
        /\bccds_[A-Za-z0-9_-]{8,}/g,
        /[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}/g,
      ];
      const unfiltered = (text: string) =>
        patterns.reduce((out, re) => out.replace(re, '[redacted]'), text);
      const piece = fc.oneof(
        fc.constantFrom(JWT, EMAIL, OPERATOR_TOKEN, 'Bearer abc.def', 'eyJ', '@', 'ccds_', '.org'),
        fc.string({ unit: fc.constantFrom('a', 'Z', '0', '.', '_', '-', '@', ' ', 'e', 'y', 'J') }),
      );
      fc.assert(
        fc.property(fc.array(piece, { maxLength: 8 }), (pieces) => {
          const text = pieces.join('');
          expect(scrubSecrets(text)).to.equal(unfiltered(text));
        }),
        { numRuns: 2000 },
      );
      expect(scrubSecrets(`a${'f'.repeat(64)}b`)).to.equal(`a${'f'.repeat(64)}b`);
    });
  });

  describe('the app, called with planted PHI on every path', function () {
    this.timeout(60_000);
    let t: TestApp;
    let issuer: TestIssuer;
    const svc = (id: string) => `${PUBLIC_URL}/cds-services/${id}`;

    before(async () => {
      t = await buildTestApp();
      expect((await t.uploadPack(tinyPack('tiny'))).status).to.equal(201);
      issuer = await t.addTenant('tenant-a', {
        subscriptions: [{ pack: 'tiny', version: '1.0.0' }],
      });
    });
    after(async () => t.close());

    it('logs none of it: calls, refusals, bad bodies, bad tokens, feedback', async () => {
      const sign = (id: string) => issuer.sign({ aud: svc(id) });
      const pv = patientViewRequest(NAME);
      (pv.prefetch as Record<string, unknown>).patient = patientResource();
      pv.fhirServer = 'https://fhir.not-allowed.example/r4';
      pv.fhirAuthorization = {
        access_token: OPAQUE_ACCESS_TOKEN,
        token_type: 'Bearer',
        expires_in: 300,
        scope: 'patient/*.read',
        subject: EMAIL,
      };
      const calls: Array<[string, () => Promise<request.Response>]> = [
        [
          'patient-view with a planted patient',
          async () =>
            request(t.app)
              .post('/cds-services/tiny-patient-view')
              .set('authorization', `Bearer ${await sign('tiny-patient-view')}`)
              .send(pv),
        ],
        [
          'order-sign with planted context',
          async () => {
            const body = warfarinNsaidRequest();
            (body.context as Record<string, unknown>).patientId = MRN;
            return request(t.app)
              .post('/cds-services/tiny-order-sign')
              .set('authorization', `Bearer ${await sign('tiny-order-sign')}`)
              .send(body);
          },
        ],
        [
          'a bad context field carrying a name',
          async () =>
            request(t.app)
              .post('/cds-services/tiny-patient-view')
              .set('authorization', `Bearer ${await sign('tiny-patient-view')}`)
              .send({ ...pv, context: { userId: NAME, patientId: { mrn: MRN } } }),
        ],
        [
          'a body that is not JSON',
          async () =>
            request(t.app)
              .post('/cds-services/tiny-patient-view')
              .set('authorization', `Bearer ${await sign('tiny-patient-view')}`)
              .set('content-type', 'application/json')
              .send(`{"hook": "${NAME}", ${MRN_DIGITS}`),
        ],
        [
          'a forged token',
          async () =>
            request(t.app)
              .post('/cds-services/tiny-patient-view')
              .set('authorization', `Bearer ${JWT}`)
              .send(pv),
        ],
        [
          'an unknown operator token',
          async () =>
            request(t.app).get('/admin/tenants').set('authorization', `Bearer ${OPERATOR_TOKEN}`),
        ],
        [
          'feedback with a planted comment',
          async () =>
            request(t.app)
              .post('/cds-services/tiny-patient-view/feedback')
              .set('authorization', `Bearer ${await sign('tiny-patient-view/feedback')}`)
              .send({
                feedback: [
                  {
                    card: crypto.randomUUID(),
                    outcome: 'overridden',
                    overrideReason: { userComment: `${NAME} ${MRN} refused` },
                    outcomeTimestamp: new Date().toISOString(),
                  },
                ],
              }),
        ],
      ];
      const statuses: Record<string, number> = {};
      for (const [name, call] of calls) {
        statuses[name] = (await call()).status;
      }
      expect(statuses['a forged token']).to.equal(401);
      expect(statuses['an unknown operator token']).to.equal(401);
      expect(statuses['a body that is not JSON']).to.equal(400);
      assertNoPlanted(t.logLines, [t.adminToken]);
      const parsed = t.logLines.map((l) => JSON.parse(l) as Record<string, unknown>);
      const hookLine = parsed.find((l) => l.msg === 'hook call');
      expect(hookLine, 'a hook call was logged').to.not.equal(undefined);
      expect(hookLine).to.include({ tenant: 'tenant-a' });
      expect(hookLine!.requestId).to.be.a('string');
    });
  });
});
