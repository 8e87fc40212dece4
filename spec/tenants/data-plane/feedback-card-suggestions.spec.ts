/**
 * Each card's own suggestion uuids are kept on its card link (schema 5), and feedback on a card
 * may accept only those. Stores and backups from before schema 5 have links without them: they
 * keep working, their cards checked against the invocation's suggestions (the fallback).
 */
import fs from 'node:fs';
import path from 'node:path';
import { expect } from 'chai';
import { Sequelize } from 'sequelize';
import { InvalidInputError, NotFoundError } from '../../../tenants/errors.ts';
import type { NewInvocation, TenantStore } from '../../../tenants/data-plane.ts';
import { fixChecksum, resign } from './backup-tamper.ts';
import { asInstance, forEachBackend, invocation, makeEnv, rejection } from './helpers.ts';
import type { Env, RawDb } from './helpers.ts';

const SERVICE = 'med-safety';

/** An invocation of two cards, each with a suggestion of its own. */
function twoCards(id: string, extra: Partial<NewInvocation> = {}): NewInvocation {
  return invocation(id, 'PHI', {
    cardUuids: [`c1-${id}`, `c2-${id}`],
    suggestionUuids: [`s1-${id}`, `s2-${id}`],
    cardSuggestionUuids: [[`s1-${id}`], [`s2-${id}`]],
    ...extra,
  });
}

const accepting = (card: string, suggestion: string, at = '2025-01-01T13:00:00Z') => ({
  card,
  outcome: 'accepted' as const,
  outcomeTimestamp: at,
  acceptedSuggestions: [{ id: suggestion }],
});

async function refusedAs(p: Promise<unknown>): Promise<string> {
  return asInstance(await rejection(p), NotFoundError).message;
}

/** The per-card columns of schema 5 dropped and the schema number set back: a schema 4 store. */
async function downgradeToSchema4(raw: RawDb): Promise<void> {
  await raw.exec(`ALTER TABLE ${raw.t('invocation_cards')} DROP COLUMN suggestion_uuids`);
  await raw.exec(`ALTER TABLE ${raw.t('invocations')} DROP COLUMN card_suggestion_uuids`);
  await raw.exec(`UPDATE ${raw.t('meta')} SET value = '4' WHERE key = 'schema'`);
}

forEachBackend('tenants/ data plane: feedback suggestions are checked per card', (backend) => {
  let env: Env;
  beforeEach(async () => {
    env = await makeEnv(backend);
  });
  afterEach(async () => env.close());

  const links = async (raw: RawDb) =>
    raw.query<{ card_uuid: string; suggestion_uuids: string | null }>(
      `SELECT card_uuid, suggestion_uuids FROM ${raw.t('invocation_cards')} ORDER BY card_uuid`,
    );

  it("keeps each card's suggestions on its link, and refuses a card accepting another card's (404, whole batch, nothing stored)", async () => {
    const s = env.stores.store('acme');
    await s.saveInvocation(twoCards('inv-1'));
    await s.saveInvocation(invocation('inv-2')); // no per-card list given
    const raw = await env.raw('acme');
    expect(await links(raw)).to.deep.equal([
      { card_uuid: 'c1-inv-1', suggestion_uuids: '["s1-inv-1"]' },
      { card_uuid: 'c2-inv-1', suggestion_uuids: '["s2-inv-1"]' },
      { card_uuid: 'card-inv-2', suggestion_uuids: null },
    ]);
    for (const items of [
      [accepting('c1-inv-1', 's2-inv-1')],
      [
        accepting('c2-inv-1', 's2-inv-1'),
        accepting('c1-inv-1', 's2-inv-1', '2025-01-01T13:01:00Z'),
      ],
      [accepting('c2-inv-1', 's1-inv-1')],
    ]) {
      expect(await refusedAs(s.saveFeedback(items, { service: SERVICE }))).to.equal(
        'suggestion not found',
      );
    }
    expect((await s.readInvocation('inv-1')).feedback).to.deep.equal([]);
    const stored = await s.saveFeedback(
      [accepting('c1-inv-1', 's1-inv-1'), accepting('c2-inv-1', 's2-inv-1')],
      { service: SERVICE },
    );
    expect(stored).to.include({ stored: 2, duplicates: 0 });
    // The summary keeps its shape: no per-card field.
    const [summary] = await s.listInvocations({ limit: 1 });
    expect(summary).to.not.have.property('cardSuggestionUuids');
  });

  it('refuses per-card suggestion lists that do not split suggestionUuids among the cards (400)', async () => {
    const s = env.stores.store('acme');
    const bad: Array<[string, Partial<NewInvocation>]> = [
      ['one list for two cards', { cardSuggestionUuids: [['s1-x', 's2-x']] }],
      ['a suggestion under no card', { cardSuggestionUuids: [['s1-x'], []] }],
      ['a suggestion under two cards', { cardSuggestionUuids: [['s1-x', 's2-x'], ['s2-x']] }],
      ['a suggestion the invocation does not list', { cardSuggestionUuids: [['s1-x'], ['s9-x']] }],
      ['a list that is not an array', { cardSuggestionUuids: 's1-x' as unknown as string[][] }],
    ];
    for (const [name, extra] of bad) {
      const err = asInstance(
        await rejection(s.saveInvocation(twoCards('x', extra))),
        InvalidInputError,
      );
      expect(err.field, name).to.match(/^cardSuggestionUuids/);
    }
    expect(await s.listInvocations()).to.deep.equal([]);
  });

  it('an older store (links without per-card suggestions) is upgraded when opened and checks its old cards against their invocation (the fallback)', async () => {
    const s = env.stores.store('acme');
    await s.saveInvocation(twoCards('inv-1'));
    await env.stores.close();
    const raw = await env.raw('acme');
    await downgradeToSchema4(raw);

    const stores = await env.reopen();
    const again = stores.store('acme');
    await expectFallback(again, 'inv-1');
    const [schema] = await raw.query<{ value: string }>(
      `SELECT value FROM ${raw.t('meta')} WHERE key = 'schema'`,
    );
    expect(schema?.value).to.equal('6'); // upgraded to the current version when first used
    expect((await links(raw)).map((l) => l.suggestion_uuids)).to.deep.equal([null, null]);
    // Records written after the upgrade are checked per card.
    await again.saveInvocation(twoCards('inv-3'));
    expect(
      await refusedAs(
        again.saveFeedback([accepting('c1-inv-3', 's2-inv-3')], { service: SERVICE }),
      ),
    ).to.equal('suggestion not found');
  });

  it('a backup from before per-card suggestions restores, and its cards are checked against their invocation', async () => {
    const s = env.stores.store('acme');
    await s.saveInvocation(twoCards('inv-1'));
    const backup = await env.stores.backupTenant('acme', env.backupDir);
    // What the previous version wrote: no per-card columns or fields, schema 4.
    if (backend === 'sqlite') {
      const db = new Sequelize({
        dialect: 'sqlite',
        storage: path.join(backup.path, 'store.sqlite'),
        logging: false,
      });
      await db.query('ALTER TABLE invocation_cards DROP COLUMN suggestion_uuids');
      await db.query('ALTER TABLE invocations DROP COLUMN card_suggestion_uuids');
      await db.query(`UPDATE meta SET value = '4' WHERE key = 'schema'`);
      await db.query('VACUUM');
      await db.close();
      fixChecksum(backup.path, 'store.sqlite');
    } else {
      const file = path.join(backup.path, 'store.json');
      const dump = JSON.parse(fs.readFileSync(file, 'utf8')) as {
        tables: Record<string, Array<Record<string, unknown>>>;
      };
      for (const row of dump.tables.invocation_cards ?? []) {
        delete row.suggestionUuids;
      }
      for (const row of dump.tables.invocations ?? []) {
        delete row.cardSuggestionUuids;
      }
      for (const row of dump.tables.meta ?? []) {
        if (row.key === 'schema') {
          row.value = '4';
        }
      }
      fs.writeFileSync(file, JSON.stringify(dump));
      fixChecksum(backup.path, 'store.json');
    }
    await resign(env.provider, backup.path);
    await s.saveInvocation(twoCards('inv-2'));

    const restored = await env.stores.restoreTenant(backup.path, { tenant: 'acme' });
    expect(restored).to.include({ authenticated: true, keyAvailable: true });
    const after = env.stores.store('acme');
    expect((await after.listInvocations()).map((i) => i.id)).to.deep.equal(['inv-1']);
    expect((await after.readInvocation('inv-1')).secret.cards).to.be.an('array');
    await expectFallback(after, 'inv-1');
  });

  /** Old links: a card may accept any suggestion of its invocation, none from elsewhere. */
  async function expectFallback(store: TenantStore, id: string): Promise<void> {
    expect(
      await refusedAs(
        store.saveFeedback([accepting(`c1-${id}`, 's-from-elsewhere')], { service: SERVICE }),
      ),
    ).to.equal('suggestion not found');
    const stored = await store.saveFeedback([accepting(`c1-${id}`, `s2-${id}`)], {
      service: SERVICE,
    });
    expect(stored).to.include({ stored: 1 });
    expect((await store.readInvocation(id)).feedback).to.have.length(1);
  }
});
