/**
 * The override-rate report, `GET /admin/tenants/{id}/feedback/summary`: real order-sign calls
 * (real client JWTs) whose pack answers two cards from two rules, real feedback (accepted,
 * overridden with an offered reason, with a reason the card never offered, with free text),
 * then the report per pack, version and rule. Who may read it (the operator, the tenant's own
 * tenant-admin and auditor; never a rule-author or another tenant's admin), its query checks,
 * its audit event, and that it opens nothing sealed and answers no PHI. SQLite, and PostgreSQL
 * with CELLCDS_TEST_PG_URL.
 */
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { expect } from 'chai';
import request from 'supertest';
import { tinyPack, warfarinNsaidRequest } from '../helpers/packs.ts';
import { createSpecDatabase, regionEnv, type SpecDatabase } from '../helpers/pg-region.ts';
import { buildTestApp, PUBLIC_URL, type TestApp } from '../helpers/test-app.ts';
import type { TestIssuer } from '../helpers/test-issuer.ts';

const PG_URL = process.env.CELLCDS_TEST_PG_URL;
const TENANT = 'hosp-fbsum';
const OTHER = 'hosp-fbsum-b';
const PACK = 'fbsum';
const SERVICE = `${PACK}-order-sign`;
const backends = PG_URL ? (['sqlite', 'postgres'] as const) : (['sqlite'] as const);

const OVERRIDE_SYSTEM = 'http://example.org/override';
const BENEFIT = `${OVERRIDE_SYSTEM}|benefit`;
const DECLINED = `${OVERRIDE_SYSTEM}|declined`;
/** Planted in what the EHR sends: none of it may come back in a report. */
const PLANTED = {
  comment: 'Planted-Comment-Jane-Roe',
  display: 'Planted-Display-MRN-4711',
  code: 'Planted-Code-MRN-4711',
};

/** The tiny pack, two reasons per card, and a second order-sign rule on the same trigger. */
function twoRulePack(version = '1.0.0'): Record<string, unknown> {
  const pack = tinyPack(PACK, version);
  const rules = pack.rules as Array<Record<string, unknown>>;
  const first = rules[0] as { card: Record<string, unknown> } & Record<string, unknown>;
  first.card.overrideReasons = [
    { system: OVERRIDE_SYSTEM, code: 'benefit', display: 'Benefit outweighs risk' },
    { system: OVERRIDE_SYSTEM, code: 'declined', display: 'Patient declined' },
  ];
  rules.splice(1, 0, {
    ...first,
    id: 'warfarin-nsaid-monitor',
    card: { ...first.card, summary: 'Monitor INR closely' },
  });
  return pack;
}

interface CardOut {
  uuid: string;
  summary: string;
  suggestions: Array<{ uuid: string }>;
}

interface SummaryRow {
  packId: string;
  packVersion: string;
  ruleId: string | null;
  shown: number;
  accepted: number;
  overridden: number;
  overrideRate: number | null;
  reasons: Record<string, number>;
}

for (const backend of backends) {
  describe(`server: feedback override-rate report [${backend}]`, function () {
    this.timeout(60_000);
    let t: TestApp;
    let issuer: TestIssuer;
    let otherIssuer: TestIssuer;
    let dir: string;
    let db: SpecDatabase | undefined;
    let tokens: Record<
      'tenantAdmin' | 'auditor' | 'otherAdmin' | 'otherAuditor' | 'author',
      string
    >;
    const url = `${PUBLIC_URL}/cds-services/${SERVICE}`;
    const op = (r: request.Test) => r.set('authorization', `Bearer ${t.adminToken}`);
    const as = (token: string, p: string) =>
      request(t.app).get(p).set('authorization', `Bearer ${token}`);
    const summaryPath = (tenant = TENANT, query = '') =>
      `/admin/tenants/${tenant}/feedback/summary${query}`;
    let started: string;

    before(async () => {
      dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cellcds-fb-summary-'));
      const env: Record<string, string> = { CELLCDS_SEED_DEMO: 'false' };
      if (backend === 'postgres') {
        db = await createSpecDatabase('fbsummary');
        Object.assign(env, regionEnv(dir, db.url));
      }
      t = await buildTestApp(env);
      for (const version of ['1.0.0', '1.1.0']) {
        const up = await t.uploadPack(twoRulePack(version));
        expect(up.status, JSON.stringify(up.body)).to.equal(201);
      }
      issuer = await t.addTenant(TENANT, { subscriptions: [{ pack: PACK, version: '1.0.0' }] });
      otherIssuer = await t.addTenant(OTHER, {
        subscriptions: [{ pack: PACK, version: '1.0.0' }],
      });
      const issue = async (body: Record<string, unknown>) => {
        const res = await op(request(t.app).post('/admin/tokens')).send(body);
        expect(res.status, JSON.stringify(res.body)).to.equal(201);
        return res.body.token as string;
      };
      tokens = {
        tenantAdmin: await issue({ role: 'tenant-admin', tenant: TENANT }),
        auditor: await issue({ role: 'auditor', tenant: TENANT }),
        otherAdmin: await issue({ role: 'tenant-admin', tenant: OTHER }),
        otherAuditor: await issue({ role: 'auditor', tenant: OTHER }),
        author: await issue({ role: 'rule-author' }),
      };
      started = new Date().toISOString();
    });
    after(async () => {
      await t.close();
      await db?.drop();
      fs.rmSync(dir, { recursive: true, force: true });
    });

    /** A real order-sign call: its two cards (warfarin-nsaid's first). */
    async function call(by = issuer): Promise<[CardOut, CardOut]> {
      const res = await request(t.app)
        .post(`/cds-services/${SERVICE}`)
        .set('authorization', `Bearer ${await by.sign({ aud: url })}`)
        .send(warfarinNsaidRequest());
      expect(res.status, JSON.stringify(res.body)).to.equal(200);
      const cards = res.body.cards as CardOut[];
      expect(cards.map((c) => c.summary)).to.deep.equal([
        'Warfarin with an NSAID draft',
        'Monitor INR closely',
      ]);
      return cards as [CardOut, CardOut];
    }

    const feedback = async (items: Array<Record<string, unknown>>, by = issuer) => {
      const res = await request(t.app)
        .post(`/cds-services/${SERVICE}/feedback`)
        .set('authorization', `Bearer ${await by.sign({ aud: `${url}/feedback` })}`)
        .send({ feedback: items });
      expect(res.status, JSON.stringify(res.body)).to.equal(200);
    };
    const at = '2026-11-26T10:05:31Z';
    const overriding = (card: CardOut, reason?: Record<string, unknown>) => ({
      card: card.uuid,
      outcome: 'overridden',
      outcomeTimestamp: at,
      ...(reason ? { overrideReason: reason } : {}),
    });
    const accepting = (card: CardOut) => ({
      card: card.uuid,
      outcome: 'accepted',
      acceptedSuggestions: [{ id: card.suggestions[0]?.uuid ?? '' }],
      outcomeTimestamp: at,
    });

    /** The tenant's chain from `afterSeq`: what the data plane appended meanwhile. */
    const chainSince = async (afterSeq: number) =>
      t.deps.stores.store(TENANT).audit.list({ afterSeq, limit: 1000 });

    const subscribe = async (version: string) => {
      const res = await op(request(t.app).put(`/admin/tenants/${TENANT}/subscriptions`)).send([
        { pack: PACK, version },
      ]);
      expect(res.status, JSON.stringify(res.body)).to.equal(200);
    };

    it('counts cards shown, accepted and overridden per pack version and rule, and overrides per offered reason code only', async () => {
      // Only this test's calls: the window starts now (other tests' calls came before).
      await subscribe('1.0.0');
      const from = new Date().toISOString();
      const [a1, m1] = await call();
      const [a2, m2] = await call();
      const [a3] = await call();
      await feedback([
        // An offered reason, with a display and the clinician's words: counted under its code.
        overriding(a1, {
          reason: { system: OVERRIDE_SYSTEM, code: 'benefit', display: PLANTED.display },
          userComment: PLANTED.comment,
        }),
        accepting(m1),
      ]);
      // A code the card never offered, and free text alone: overridden, under no code.
      await feedback([
        overriding(a2, { reason: { system: 'urn:ehr:local', code: PLANTED.code } }),
        overriding(m2, { userComment: PLANTED.comment }),
      ]);
      // The same card overridden twice (two reports): one card, under both offered codes.
      await feedback([
        overriding(a3, { reason: { system: OVERRIDE_SYSTEM, code: 'declined' } }),
        {
          ...overriding(a3, { reason: { system: OVERRIDE_SYSTEM, code: 'benefit' } }),
          outcomeTimestamp: '2026-11-26T10:07:00Z',
        },
      ]);
      // The tenant moves to 1.1.0: its cards count apart.
      await subscribe('1.1.0');
      const [b1] = await call();
      await feedback([accepting(b1)]);
      // Another tenant's calls and feedback never count here.
      const [o1] = await call(otherIssuer);
      await feedback(
        [overriding(o1, { reason: { system: OVERRIDE_SYSTEM, code: 'benefit' } })],
        otherIssuer,
      );

      const res = await as(
        tokens.tenantAdmin,
        summaryPath(TENANT, `?since=${encodeURIComponent(from)}`),
      );
      expect(res.status, JSON.stringify(res.body)).to.equal(200);
      expect(res.body.tenant).to.equal(TENANT);
      expect(res.body.since).to.equal(from);
      expect(res.body.rows as SummaryRow[]).to.deep.equal([
        {
          packId: PACK,
          packVersion: '1.0.0',
          ruleId: 'warfarin-nsaid',
          shown: 3,
          accepted: 0,
          overridden: 3,
          overrideRate: 1,
          reasons: { [BENEFIT]: 2, [DECLINED]: 1 },
        },
        {
          packId: PACK,
          packVersion: '1.0.0',
          ruleId: 'warfarin-nsaid-monitor',
          shown: 3,
          accepted: 1,
          overridden: 1,
          overrideRate: 0.5,
          reasons: {},
        },
        {
          packId: PACK,
          packVersion: '1.1.0',
          ruleId: 'warfarin-nsaid',
          shown: 1,
          accepted: 1,
          overridden: 0,
          overrideRate: 0,
          reasons: {},
        },
        {
          packId: PACK,
          packVersion: '1.1.0',
          ruleId: 'warfarin-nsaid-monitor',
          shown: 1,
          accepted: 0,
          overridden: 0,
          overrideRate: null,
          reasons: {},
        },
      ]);
      // Nothing the EHR wrote, and no patient data, in the answer.
      for (const planted of [...Object.values(PLANTED), 'pat-1', 'Warfarin Sodium', 'Ibuprofen']) {
        expect(res.text).to.not.include(planted);
      }
      expect(res.text).to.not.include('Benefit outweighs risk'); // a display, even the pack's

      // The auditor and the operator read the same report; a window before the calls is empty.
      for (const token of [tokens.auditor, t.adminToken]) {
        const same = await as(token, summaryPath(TENANT, `?since=${encodeURIComponent(from)}`));
        expect(same.status, JSON.stringify(same.body)).to.equal(200);
        expect(same.body.rows).to.deep.equal(res.body.rows);
      }
      const before = await as(
        tokens.auditor,
        summaryPath(TENANT, `?since=2020-01-01T00:00:00Z&until=${encodeURIComponent(started)}`),
      );
      expect(before.status, JSON.stringify(before.body)).to.equal(200);
      expect(before.body).to.deep.equal({
        tenant: TENANT,
        since: '2020-01-01T00:00:00.000Z',
        until: started,
        rows: [],
      });
    });

    it('defaults to the last 30 days until now', async () => {
      const res = await as(tokens.auditor, summaryPath());
      expect(res.status, JSON.stringify(res.body)).to.equal(200);
      const until = Date.parse(res.body.until as string);
      expect(Math.abs(until - Date.now())).to.be.lessThan(60_000);
      expect(until - Date.parse(res.body.since as string)).to.equal(30 * 86_400_000);
    });

    it('opens no record and uses no key: the tenant chain gains nothing, and the read is audited feedback.summary with actor and window', async () => {
      const [a] = await call();
      await feedback([overriding(a, { reason: { system: OVERRIDE_SYSTEM, code: 'benefit' } })]);
      const head = await t.deps.stores.store(TENANT).audit.head();
      const since = '2026-01-01T00:00:00Z';
      const until = new Date(Date.now() + 60_000).toISOString();
      const res = await as(
        tokens.auditor,
        summaryPath(TENANT, `?since=${since}&until=${encodeURIComponent(until)}`),
      );
      expect(res.status, JSON.stringify(res.body)).to.equal(200);
      expect((res.body.rows as SummaryRow[]).length).to.be.greaterThan(0);
      // No record.read, no key.unwrap: nothing sealed was opened for the report.
      expect(await chainSince(head.seq)).to.deep.equal([]);

      const audit = await op(
        request(t.app).get(`/admin/audit?tenant=${TENANT}&type=feedback.summary`),
      );
      expect(audit.status).to.equal(200);
      const events = audit.body.events as Array<{
        actor: string;
        outcome: string;
        detail: Record<string, unknown>;
      }>;
      const mine = events.find(
        (e) => e.detail.since === '2026-01-01T00:00:00.000Z' && e.detail.until === until,
      );
      expect(mine, JSON.stringify(events)).to.not.equal(undefined);
      expect(mine?.actor).to.match(/^auditor:/);
      expect(mine?.outcome).to.equal('success');
      expect(Object.keys(mine?.detail ?? {}).sort()).to.deep.equal(['rows', 'since', 'until']);
    });

    it("refuses a rule-author and another tenant's admin and auditor (403, audited); no report of B for A", async () => {
      for (const token of [tokens.author, tokens.otherAdmin, tokens.otherAuditor]) {
        const res = await as(token, summaryPath());
        expect(res.status, JSON.stringify(res.body)).to.equal(403);
        expect(res.body.error).to.equal('forbidden');
        expect(res.body).to.not.have.property('rows');
      }
      for (const token of [tokens.tenantAdmin, tokens.auditor]) {
        const res = await as(token, summaryPath(OTHER));
        expect(res.status, JSON.stringify(res.body)).to.equal(403);
        expect(res.body).to.not.have.property('rows');
      }
      const audit = await op(
        request(t.app).get(`/admin/audit?tenant=${OTHER}&type=admin.forbidden`),
      );
      const refused = (audit.body.events as Array<{ detail: Record<string, unknown> }>).filter(
        (e) => e.detail.endpoint === '/admin/tenants/:id/feedback/summary',
      );
      expect(refused.length).to.be.greaterThan(0);
      // A tenant no one registered: 404 for the operator (nothing is created for it).
      const unknown = await as(t.adminToken, summaryPath('hosp-nowhere'));
      expect(unknown.status, JSON.stringify(unknown.body)).to.equal(404);
    });

    /** The CLI as an operator runs it, on this app's data directory (a process of its own). */
    const cli = (args: string[]) =>
      new Promise<{ status: number | null; stdout: string; stderr: string }>((resolve) => {
        const child = spawn(process.execPath, ['--import', 'tsx', 'server/cli.ts', ...args], {
          env: {
            ...process.env,
            CELLCDS_DATA_DIR: t.dataDir,
            CELLCDS_PUBLIC_URL: PUBLIC_URL,
            CELLCDS_LOG_LEVEL: 'silent',
            ...(backend === 'postgres' ? regionEnv(dir, db?.url ?? '') : {}),
          },
        });
        let stdout = '';
        let stderr = '';
        child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
        child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
        child.on('close', (status) => {
          resolve({ status, stdout, stderr });
        });
      });

    it('cellcds feedback summary: the same report as a table or JSON, locally or through a server; bad dates exit 2', async () => {
      await subscribe('1.0.0');
      const from = new Date().toISOString();
      const [a] = await call();
      await feedback([overriding(a, { reason: { system: OVERRIDE_SYSTEM, code: 'benefit' } })]);
      const api = await as(tokens.auditor, summaryPath(TENANT, `?since=${from}`));
      expect(api.status, JSON.stringify(api.body)).to.equal(200);

      const json = await cli([
        'feedback',
        'summary',
        '--tenant',
        TENANT,
        '--since',
        from,
        '--json',
      ]);
      expect(json.status, json.stderr).to.equal(0);
      expect((JSON.parse(json.stdout) as { rows: unknown }).rows).to.deep.equal(api.body.rows);
      const table = await cli(['feedback', 'summary', '--tenant', TENANT, '--since', from]);
      expect(table.status, table.stderr).to.equal(0);
      const lines = table.stdout.split('\n').map((l) => l.replace(/ +/g, ' ').trim());
      expect(lines).to.include('PACK VERSION RULE SHOWN ACCEPTED OVERRIDDEN OVERRIDE RATE');
      expect(lines).to.include(`${PACK} 1.0.0 warfarin-nsaid 1 0 1 100.0%`);
      expect(lines).to.include(`overridden: ${BENEFIT} 1`);
      expect(lines).to.include(`${PACK} 1.0.0 warfarin-nsaid-monitor 1 0 0 -`);
      const audit = await op(
        request(t.app).get(`/admin/audit?tenant=${TENANT}&type=feedback.summary`),
      );
      const actors = (audit.body.events as Array<{ actor: string }>).map((e) => e.actor);
      expect(actors).to.include('platform-operator:cli');

      // Through a running server, with the tenant's auditor token.
      const server = http.createServer(t.app);
      await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
      try {
        const base = `http://127.0.0.1:${String((server.address() as AddressInfo).port)}`;
        const remote = await cli([
          'feedback',
          'summary',
          '--tenant',
          TENANT,
          '--since',
          from,
          '--json',
          '--url',
          base,
          '--token',
          tokens.auditor,
        ]);
        expect(remote.status, remote.stderr).to.equal(0);
        expect((JSON.parse(remote.stdout) as { rows: unknown }).rows).to.deep.equal(api.body.rows);
        const refused = await cli([
          'feedback',
          'summary',
          '--tenant',
          TENANT,
          '--url',
          base,
          '--token',
          tokens.author,
        ]);
        expect(refused.status).to.equal(1);
        expect(refused.stderr).to.include('403');
      } finally {
        await new Promise<void>((resolve) =>
          server.close(() => {
            resolve();
          }),
        );
      }

      const bad = await cli(['feedback', 'summary', '--tenant', TENANT, '--since', 'yesterday']);
      expect(bad.status).to.equal(2);
      expect(bad.stderr).to.include('since: must be an ISO 8601 instant');
    });

    it('refuses unknown or repeated query parameters and bad dates with 400 naming the field', async () => {
      const bad: Array<[string, string]> = [
        ['?from=2026-01-01T00:00:00Z', 'from'],
        ['?since=2026-01-01T00:00:00Z&tenant=hosp-fbsum-b', 'tenant'],
        ['?since=2026-01-01T00:00:00Z&since=2026-02-01T00:00:00Z', 'since'],
        ['?since=yesterday', 'since'],
        ['?until=2026-13-45T00:00:00Z', 'until'],
        ['?since=', 'since'],
        ['?since=2026-02-01T00:00:00Z&until=2026-01-01T00:00:00Z', 'since'],
      ];
      for (const [query, field] of bad) {
        const res = await as(tokens.tenantAdmin, summaryPath(TENANT, query));
        expect(res.status, `${query}: ${JSON.stringify(res.body)}`).to.equal(400);
        expect(res.body.error).to.equal('invalid_request');
        expect(res.body.field, query).to.equal(field);
      }
    });
  });
}
