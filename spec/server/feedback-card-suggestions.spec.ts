/**
 * Feedback's acceptedSuggestions are checked per card (CDS Hooks 2.0: the suggestions of THAT
 * card the user accepted), not against every suggestion of the card's invocation. A real
 * order-sign call whose pack answers two cards, each with a suggestion of its own; feedback on
 * card 1 accepting card 2's suggestion is refused (404 when nothing else was sent, nothing
 * stored; the other items of a batch are stored), on the live store and on one restored from its
 * backup. SQLite, and PostgreSQL with CELLCDS_TEST_PG_URL.
 */
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
const TENANT = 'hosp-cards';
const SERVICE = 'twocards-order-sign';
const backends = PG_URL ? (['sqlite', 'postgres'] as const) : (['sqlite'] as const);

/** The tiny pack with a second order-sign rule: the same trigger, its own card and suggestion. */
function twoCardPack(): Record<string, unknown> {
  const pack = tinyPack('twocards');
  const rules = pack.rules as Array<Record<string, unknown>>;
  const first = rules[0] as { card: Record<string, unknown> } & Record<string, unknown>;
  rules.splice(1, 0, {
    ...first,
    id: 'warfarin-nsaid-monitor',
    card: {
      ...first.card,
      summary: 'Monitor INR closely',
      suggestions: [
        {
          label: 'Order an INR test',
          actions: [
            {
              type: 'create',
              description: 'Order an INR',
              resource: {
                resourceType: 'ServiceRequest',
                status: 'draft',
                intent: 'order',
                subject: { reference: 'Patient/pat-1' },
                code: { text: 'INR' },
              },
            },
          ],
        },
      ],
    },
  });
  return pack;
}

interface CardOut {
  uuid: string;
  summary: string;
  suggestions: Array<{ uuid: string }>;
}

for (const backend of backends) {
  describe(`server: feedback suggestions are checked per card [${backend}]`, function () {
    this.timeout(60_000);
    let t: TestApp;
    let issuer: TestIssuer;
    let dir: string;
    let db: SpecDatabase | undefined;
    const url = `${PUBLIC_URL}/cds-services/${SERVICE}`;
    const op = (r: request.Test) => r.set('authorization', `Bearer ${t.adminToken}`);

    before(async () => {
      dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cellcds-fb-cards-'));
      const env: Record<string, string> = { CELLCDS_SEED_DEMO: 'false' };
      if (backend === 'postgres') {
        db = await createSpecDatabase('fbcards');
        Object.assign(env, regionEnv(dir, db.url));
      }
      t = await buildTestApp(env);
      const up = await t.uploadPack(twoCardPack());
      expect(up.status, JSON.stringify(up.body)).to.equal(201);
      issuer = await t.addTenant(TENANT, {
        subscriptions: [{ pack: 'twocards', version: '1.0.0' }],
      });
    });
    after(async () => {
      await t.close();
      await db?.drop();
      fs.rmSync(dir, { recursive: true, force: true });
    });

    /** A real order-sign call: its invocation id and its two cards. */
    async function call(): Promise<{ invocationId: string; cards: [CardOut, CardOut] }> {
      const res = await request(t.app)
        .post(`/cds-services/${SERVICE}`)
        .set('authorization', `Bearer ${await issuer.sign({ aud: url })}`)
        .send(warfarinNsaidRequest());
      expect(res.status, JSON.stringify(res.body)).to.equal(200);
      const cards = res.body.cards as CardOut[];
      expect(cards).to.have.length(2);
      for (const c of cards) {
        expect(c.suggestions).to.have.length(1);
      }
      const [list] = await t.deps.stores
        .store(TENANT)
        .listInvocations({ limit: 1000 })
        .then((all) => all.filter((i) => i.cardUuids.includes(cards[0]?.uuid ?? '')));
      expect(list, 'the call is recorded').to.not.equal(undefined);
      return { invocationId: list?.id ?? '', cards: cards as [CardOut, CardOut] };
    }

    const feedback = async (items: Array<Record<string, unknown>>) =>
      request(t.app)
        .post(`/cds-services/${SERVICE}/feedback`)
        .set('authorization', `Bearer ${await issuer.sign({ aud: `${url}/feedback` })}`)
        .send({ feedback: items });

    const accepting = (card: CardOut, suggestion: string, at = '2026-11-26T10:05:31Z') => ({
      card: card.uuid,
      outcome: 'accepted',
      acceptedSuggestions: [{ id: suggestion }],
      outcomeTimestamp: at,
    });

    const storedFeedback = async (invocationId: string) =>
      (await t.deps.stores.store(TENANT).readInvocation(invocationId, { actor: 'spec' })).feedback;

    it("refuses feedback on card 1 accepting card 2's suggestion (404 alone; only that item in a batch); card 1 accepting its own is stored", async () => {
      const { invocationId, cards } = await call();
      const [c1, c2] = cards;
      const s1 = c1.suggestions[0]?.uuid ?? '';
      const s2 = c2.suggestions[0]?.uuid ?? '';

      const cross = await feedback([accepting(c1, s2)]);
      expect(cross.status, JSON.stringify(cross.body)).to.equal(404);
      expect(cross.body).to.deep.include({
        error: 'not_found',
        field: 'feedback[0].acceptedSuggestions[0]',
        message: 'suggestion not found: 1 feedback item refused',
      });
      expect(await storedFeedback(invocationId)).to.deep.equal([]);
      // With a valid item before it: that item is stored, the cross-card accept refused.
      const mixed = await feedback([accepting(c2, s2), accepting(c1, s2, '2026-11-26T10:06:00Z')]);
      expect(mixed.status, JSON.stringify(mixed.body)).to.equal(200);
      expect(mixed.body).to.deep.equal({
        stored: 1,
        refused: [
          {
            index: 1,
            field: 'feedback[1].acceptedSuggestions[0]',
            error: 'not_found',
            message: 'suggestion not found',
          },
        ],
      });
      expect((await storedFeedback(invocationId)).map((f) => f.card)).to.deep.equal([c2.uuid]);

      const own = await feedback([accepting(c1, s1), accepting(c2, s2)]);
      expect(own.status, JSON.stringify(own.body)).to.equal(200);
      expect(own.text, 'the c2 item is an exact repeat').to.equal('');
      const stored = await storedFeedback(invocationId);
      expect(stored.map((f) => [f.card, f.item.acceptedSuggestions])).to.deep.equal([
        [c2.uuid, [{ id: s2 }]],
        [c1.uuid, [{ id: s1 }]],
      ]);
    });

    it('the invocation record read through the admin API keeps its shape', async () => {
      const { invocationId, cards } = await call();
      const auditor = (
        await op(request(t.app).post('/admin/tokens')).send({ role: 'auditor', tenant: TENANT })
      ).body.token as string;
      const get = (p: string) => request(t.app).get(p).set('authorization', `Bearer ${auditor}`);
      const one = await get(`/admin/tenants/${TENANT}/invocations/${invocationId}`);
      expect(one.status).to.equal(200);
      expect(one.body).to.not.have.any.keys('cardSuggestionUuids');
      const res = await get(`/admin/tenants/${TENANT}/invocations`);
      expect(res.status).to.equal(200);
      const rec = (res.body.invocations as Array<Record<string, unknown>>).find(
        (i) => i.id === invocationId,
      );
      // No per-card field: the metadata as before, with the invocation's flat suggestion list.
      expect(rec).to.not.have.any.keys('cardSuggestionUuids', 'secret');
      expect(rec?.cardUuids).to.deep.equal(cards.map((c) => c.uuid));
      expect(rec?.suggestionUuids).to.deep.equal(cards.map((c) => c.suggestions[0]?.uuid));
    });

    it('a backup carries the per-card suggestions: after its restore, the cross-card accept is still refused', async () => {
      const { invocationId, cards } = await call();
      const [c1, c2] = cards;
      const backup = await op(request(t.app).post(`/admin/tenants/${TENANT}/backups`));
      expect(backup.status, JSON.stringify(backup.body)).to.equal(201);
      const restored = await op(request(t.app).post('/admin/restores')).send({
        tenant: TENANT,
        backup: path.relative(t.deps.backupDir, backup.body.path as string),
      });
      expect(restored.status, JSON.stringify(restored.body)).to.equal(200);

      const cross = await feedback([accepting(c1, c2.suggestions[0]?.uuid ?? '')]);
      expect(cross.status, JSON.stringify(cross.body)).to.equal(404);
      expect(cross.body.message).to.equal('suggestion not found: 1 feedback item refused');
      expect(await storedFeedback(invocationId)).to.deep.equal([]);
      const own = await feedback([accepting(c1, c1.suggestions[0]?.uuid ?? '')]);
      expect(own.status, JSON.stringify(own.body)).to.equal(200);
      expect(await storedFeedback(invocationId)).to.have.length(1);
    });
  });
}
