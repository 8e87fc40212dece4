/**
 * The feedback endpoint (`POST /cds-services/{id}/feedback`) stores every item of a batch that
 * can be stored and names the ones it refused: a card (or accepted suggestion) this tenant was
 * never sent refuses that item, not the batch (CDS Hooks 2.0 §7: repeats are expected, so an
 * EHR retrying a batch must not fail on it forever). A malformed item still refuses the whole
 * batch (400). Only an exact repeat (card, outcome, outcomeTimestamp, overrideReason,
 * acceptedSuggestions) is a no-op. Real order-sign calls, real JWTs, read back through the
 * admin API. SQLite, and PostgreSQL with CELLCDS_TEST_PG_URL.
 */
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { expect } from 'chai';
import request from 'supertest';
import { tinyPack, warfarinNsaidRequest } from '../helpers/packs.ts';
import { createSpecDatabase, regionEnv, type SpecDatabase } from '../helpers/pg-region.ts';
import { buildTestApp, PUBLIC_URL, type TestApp } from '../helpers/test-app.ts';
import type { TestIssuer } from '../helpers/test-issuer.ts';

const PG_URL = process.env.CELLCDS_TEST_PG_URL;
const TENANT = 'hosp-fb';
const OTHER = 'hosp-fb-other';
const SERVICE = 'fbpart-order-sign';
const backends = PG_URL ? (['sqlite', 'postgres'] as const) : (['sqlite'] as const);

interface Called {
  invocationId: string;
  card: string;
  suggestion: string;
}

interface StoredFeedback {
  card: string;
  outcome: string;
  item: Record<string, unknown>;
}

for (const backend of backends) {
  describe(`server: feedback batches store what they can [${backend}]`, function () {
    this.timeout(60_000);
    let t: TestApp;
    let issuer: TestIssuer;
    let other: TestIssuer;
    let auditor: string;
    let dir: string;
    let db: SpecDatabase | undefined;
    const url = `${PUBLIC_URL}/cds-services/${SERVICE}`;

    before(async () => {
      dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cellcds-fb-part-'));
      const env: Record<string, string> = { CELLCDS_SEED_DEMO: 'false' };
      if (backend === 'postgres') {
        db = await createSpecDatabase('fbpart');
        Object.assign(env, regionEnv(dir, db.url));
      }
      t = await buildTestApp(env);
      const up = await t.uploadPack(tinyPack('fbpart'));
      expect(up.status, JSON.stringify(up.body)).to.equal(201);
      const subscriptions = [{ pack: 'fbpart', version: '1.0.0' }];
      issuer = await t.addTenant(TENANT, { subscriptions });
      other = await t.addTenant(OTHER, { subscriptions });
      const token = await request(t.app)
        .post('/admin/tokens')
        .set('authorization', `Bearer ${t.adminToken}`)
        .send({ role: 'auditor', tenant: TENANT });
      expect(token.status, JSON.stringify(token.body)).to.equal(201);
      auditor = token.body.token as string;
    });
    after(async () => {
      await t.close();
      await db?.drop();
      fs.rmSync(dir, { recursive: true, force: true });
    });

    /** A real order-sign call by `as`: its invocation id, its card and the card's suggestion. */
    async function call(as: TestIssuer = issuer, tenant = TENANT): Promise<Called> {
      const res = await request(t.app)
        .post(`/cds-services/${SERVICE}`)
        .set('authorization', `Bearer ${await as.sign({ aud: url })}`)
        .send(warfarinNsaidRequest());
      expect(res.status, JSON.stringify(res.body)).to.equal(200);
      const card = res.body.cards[0] as { uuid: string; suggestions: Array<{ uuid: string }> };
      const all = await t.deps.stores.store(tenant).listInvocations({ limit: 1000 });
      const rec = all.find((i) => i.cardUuids.includes(card.uuid));
      expect(rec, 'the call is recorded').to.not.equal(undefined);
      return {
        invocationId: rec?.id ?? '',
        card: card.uuid,
        suggestion: card.suggestions[0]?.uuid ?? '',
      };
    }

    const feedback = async (items: Array<Record<string, unknown>>, as: TestIssuer = issuer) =>
      request(t.app)
        .post(`/cds-services/${SERVICE}/feedback`)
        .set('authorization', `Bearer ${await as.sign({ aud: `${url}/feedback` })}`)
        .send({ feedback: items });

    /** Feedback as the tenant's admins read it back: GET /admin/tenants/{id}/invocations/{rid}. */
    async function storedFeedback(invocationId: string): Promise<StoredFeedback[]> {
      const res = await request(t.app)
        .get(`/admin/tenants/${TENANT}/invocations/${invocationId}`)
        .set('authorization', `Bearer ${auditor}`);
      expect(res.status, JSON.stringify(res.body)).to.equal(200);
      return res.body.feedback as StoredFeedback[];
    }

    const overriding = (card: string, extra: Record<string, unknown> = {}) => ({
      card,
      outcome: 'overridden',
      outcomeTimestamp: '2026-11-26T10:05:31Z',
      ...extra,
    });
    const accepting = (card: string, ids: string[], at = '2026-11-26T10:05:31Z') => ({
      card,
      outcome: 'accepted',
      acceptedSuggestions: ids.map((id) => ({ id })),
      outcomeTimestamp: at,
    });
    const refusedCard = (index: number) => ({
      index,
      field: `feedback[${String(index)}].card`,
      error: 'not_found',
      message: 'card not found',
    });

    it('stores the valid item of a batch with an unknown card, names the refused one (200), and answers a retry the same', async () => {
      const { invocationId, card } = await call();
      const batch = [overriding(card), overriding(crypto.randomUUID())];
      const first = await feedback(batch);
      expect(first.status, JSON.stringify(first.body)).to.equal(200);
      expect(first.body).to.deep.equal({ stored: 1, refused: [refusedCard(1)] });
      expect((await storedFeedback(invocationId)).map((f) => [f.card, f.outcome])).to.deep.equal([
        [card, 'overridden'],
      ]);
      // The EHR retries the batch: the stored item is an exact repeat, the answer the same.
      const retry = await feedback(batch);
      expect(retry.status, JSON.stringify(retry.body)).to.equal(200);
      expect(retry.body).to.deep.equal(first.body);
      expect(await storedFeedback(invocationId)).to.have.length(1);
    });

    it('answers a batch stored whole with 200 and an empty body, as before', async () => {
      const { invocationId, card, suggestion } = await call();
      const res = await feedback([accepting(card, [suggestion]), overriding(card)]);
      expect(res.status, JSON.stringify(res.body)).to.equal(200);
      expect(res.text).to.equal('');
      expect(await storedFeedback(invocationId)).to.have.length(2);
    });

    it('refuses a batch of which nothing could be stored (404), naming the first refused item and the count', async () => {
      const res = await feedback([
        overriding(crypto.randomUUID()),
        overriding(crypto.randomUUID(), { outcomeTimestamp: '2026-11-26T10:06:00Z' }),
      ]);
      expect(res.status, JSON.stringify(res.body)).to.equal(404);
      expect(res.body).to.deep.include({
        error: 'not_found',
        field: 'feedback[0].card',
        message: 'card not found: 2 feedback items refused',
      });
      const one = await feedback([overriding(crypto.randomUUID())]);
      expect(one.status).to.equal(404);
      expect(one.body).to.deep.include({
        field: 'feedback[0].card',
        message: 'card not found: 1 feedback item refused',
      });
    });

    it('refuses an item accepting a suggestion its card never offered, naming that suggestion', async () => {
      const { invocationId, card, suggestion } = await call();
      const stray = crypto.randomUUID();
      const mixed = await feedback([
        overriding(card),
        accepting(card, [suggestion, stray], '2026-11-26T10:07:00Z'),
      ]);
      expect(mixed.status, JSON.stringify(mixed.body)).to.equal(200);
      expect(mixed.body).to.deep.equal({
        stored: 1,
        refused: [
          {
            index: 1,
            field: 'feedback[1].acceptedSuggestions[1]',
            error: 'not_found',
            message: 'suggestion not found',
          },
        ],
      });
      expect((await storedFeedback(invocationId)).map((f) => f.outcome)).to.deep.equal([
        'overridden',
      ]);
      const alone = await feedback([accepting(card, [stray], '2026-11-26T10:08:00Z')]);
      expect(alone.status, JSON.stringify(alone.body)).to.equal(404);
      expect(alone.body).to.deep.include({
        error: 'not_found',
        field: 'feedback[0].acceptedSuggestions[0]',
        message: 'suggestion not found: 1 feedback item refused',
      });
      expect(await storedFeedback(invocationId)).to.have.length(1);
    });

    it("treats another tenant's card as an unknown one (no leak), and stores the rest", async () => {
      const mine = await call();
      const theirs = await call(other, OTHER);
      const unknown = await feedback([overriding(crypto.randomUUID())]);
      const cross = await feedback([overriding(theirs.card)]);
      expect(cross.status).to.equal(404);
      expect(cross.body).to.deep.equal(unknown.body);
      const mixed = await feedback([overriding(theirs.card), overriding(mine.card)]);
      expect(mixed.status, JSON.stringify(mixed.body)).to.equal(200);
      expect(mixed.body).to.deep.equal({ stored: 1, refused: [refusedCard(0)] });
      expect((await storedFeedback(mine.invocationId)).map((f) => f.card)).to.deep.equal([
        mine.card,
      ]);
      // Nothing landed in the other tenant's store.
      const theirsRead = await t.deps.stores
        .store(OTHER)
        .readInvocation(theirs.invocationId, { actor: 'spec' });
      expect(theirsRead.feedback).to.deep.equal([]);
    });

    it('refuses a batch with a malformed item whole (400, the field named, nothing stored)', async () => {
      const { invocationId, card } = await call();
      const res = await feedback([overriding(card), overriding(card, { outcome: 'maybe' })]);
      expect(res.status, JSON.stringify(res.body)).to.equal(400);
      expect(res.body).to.deep.include({ error: 'invalid_request', field: 'feedback[1].outcome' });
      expect(await storedFeedback(invocationId)).to.deep.equal([]);
    });

    it('stores a repeat with another overrideReason or other suggestions; an exact repeat is a no-op', async () => {
      const { invocationId, card, suggestion } = await call();
      const benefit = {
        reason: { system: 'http://example.org/override', code: 'benefit', display: 'Benefit' },
      };
      const items = [
        overriding(card),
        overriding(card, { overrideReason: benefit }),
        overriding(card, { overrideReason: { ...benefit, userComment: 'discussed with patient' } }),
        overriding(card, { overrideReason: { userComment: 'discussed with patient' } }),
      ];
      for (const item of items) {
        const res = await feedback([item]);
        expect(res.status, JSON.stringify(res.body)).to.equal(200);
      }
      expect(await storedFeedback(invocationId)).to.have.length(4);
      // Exact repeats, one by one and in one batch: nothing new.
      for (const item of items) {
        expect((await feedback([item])).status).to.equal(200);
      }
      expect((await feedback(items)).status).to.equal(200);
      const stored = await storedFeedback(invocationId);
      expect(stored.map((f) => f.item.overrideReason ?? null)).to.deep.equal([
        null,
        benefit,
        { ...benefit, userComment: 'discussed with patient' },
        { userComment: 'discussed with patient' },
      ]);
      // Accepted: the set of suggestions is part of the identity, their order is not.
      expect((await feedback([accepting(card, [suggestion])])).status).to.equal(200);
      expect((await feedback([accepting(card, [suggestion, suggestion])])).status).to.equal(200);
      expect(await storedFeedback(invocationId)).to.have.length(5);
    });

    it('stores an override reason the card did not offer as sent', async () => {
      const { invocationId, card } = await call();
      const reason = {
        reason: { system: 'http://elsewhere.example/reasons', code: 'not-offered' },
        userComment: 'free text',
      };
      const res = await feedback([overriding(card, { overrideReason: reason })]);
      expect(res.status, JSON.stringify(res.body)).to.equal(200);
      const [stored] = await storedFeedback(invocationId);
      expect(stored?.item.overrideReason).to.deep.equal(reason);
    });

    it('logs how many items were stored, repeated and refused', async () => {
      const { card } = await call();
      const before = t.logLines.length;
      await feedback([
        overriding(card, { outcomeTimestamp: '2026-11-26T11:00:00Z' }),
        overriding(crypto.randomUUID()),
      ]);
      const line = t.logLines
        .slice(before)
        .map((l) => JSON.parse(l) as Record<string, unknown>)
        .find((l) => l.msg === 'feedback');
      expect(line).to.include({ feedbackCount: 2, stored: 1, duplicates: 0, refused: 1 });
    });
  });
}
