/**
 * The override-rate report of a tenant store (`feedbackSummary`, schema 6): each card's rule and
 * pack version, and the override reason codes it offered, on its link in clear; an override's
 * reason code in clear only when its card offered it. The report reads those columns only: it
 * counts right with a key provider that refuses every key. Stores and backups from before
 * schema 6 keep working, their cards counted as rule "unknown" (null); a purge drops the
 * links with their records.
 */
import fs from 'node:fs';
import path from 'node:path';
import { expect } from 'chai';
import { Sequelize } from 'sequelize';
import { InvalidInputError } from '../../../tenants/errors.ts';
import { migrateTenant } from '../../../tenants/data-plane.ts';
import type { FeedbackInput, KeyProvider, NewInvocation } from '../../../tenants/data-plane.ts';
import { fixChecksum, resign } from './backup-tamper.ts';
import {
  asInstance,
  filesContaining,
  forEachBackend,
  invocation,
  makeEnv,
  rejection,
} from './helpers.ts';
import type { Env, RawDb } from './helpers.ts';

const SERVICE = 'med-safety';
const BENEFIT = 'http://example.org/override|benefit';
const DECLINED = 'http://example.org/override|declined';
const PLANTED_CODE = 'PLANTED-MRN-4711';
const PLANTED_COMMENT = 'PLANTED-Jane-Roe';
const WINDOW = { since: '2025-01-01T00:00:00Z', until: '2025-01-02T00:00:00Z' };

/** Two cards from two rules; the first offers two override reasons. */
function twoRules(id: string, extra: Partial<NewInvocation> = {}): NewInvocation {
  return invocation(id, 'PHI', {
    cardUuids: [`c1-${id}`, `c2-${id}`],
    suggestionUuids: [],
    cardSuggestionUuids: [[], []],
    cardRules: [{ ruleId: 'rule-a', overrideReasons: [BENEFIT, DECLINED] }, { ruleId: 'rule-b' }],
    ...extra,
  });
}

const overriding = (
  card: string,
  reason?: FeedbackInput['overrideReason'],
  at = '2025-01-01T13:00:00Z',
): FeedbackInput => ({
  card,
  outcome: 'overridden',
  outcomeTimestamp: at,
  ...(reason ? { overrideReason: reason } : {}),
});
const accepting = (card: string): FeedbackInput => ({
  card,
  outcome: 'accepted',
  outcomeTimestamp: '2025-01-01T13:00:00Z',
});
const offered = (code: string) => {
  const [system = '', c = ''] = code.split('|');
  return { reason: { system, code: c, display: 'Benefit outweighs risk' } };
};

/** Schema 6's columns dropped and the schema number set back: a schema 5 store. */
async function downgradeToSchema5(raw: RawDb): Promise<void> {
  for (const column of ['rule_id', 'pack_id', 'pack_version', 'override_codes']) {
    await raw.exec(`ALTER TABLE ${raw.t('invocation_cards')} DROP COLUMN ${column}`);
  }
  await raw.exec(`ALTER TABLE ${raw.t('invocations')} DROP COLUMN card_rules`);
  await raw.exec(`ALTER TABLE ${raw.t('feedback')} DROP COLUMN reason_code`);
  await raw.exec(`UPDATE ${raw.t('meta')} SET value = '5' WHERE key = 'schema'`);
}

/** The key provider of `env`, refusing every DEK unwrap (and counting the attempts). */
function refusingProvider(env: Env): { provider: KeyProvider; unwraps: () => number } {
  let unwraps = 0;
  const provider = new Proxy(env.provider, {
    get(target, prop) {
      if (prop === 'unwrapDek') {
        return () => {
          unwraps += 1;
          return Promise.reject(new Error('no key for this spec'));
        };
      }
      const value: unknown = Reflect.get(target, prop, target);
      return typeof value === 'function' ? (value as () => unknown).bind(target) : value;
    },
  });
  return { provider, unwraps: () => unwraps };
}

forEachBackend('tenants/ data plane: feedback override-rate report', (backend) => {
  let env: Env;
  beforeEach(async () => {
    env = await makeEnv(backend);
  });
  afterEach(async () => env.close());

  it('links the cards of a batch of calls too large for one statement (PostgreSQL binds at most 65,535 parameters)', async function () {
    this.timeout(120_000);
    const s = env.stores.store('acme');
    // Twelve calls of 1,000 cards each, saved at once (one hook batch): 12,000 links, 84,000
    // parameters at 7 per link.
    const calls = Array.from({ length: 12 }, (_, k) => {
      const id = `inv-${String(k + 1)}`;
      const cards = Array.from({ length: 1000 }, (_, i) => `c${String(i)}-${id}`);
      return invocation(id, 'PHI', {
        cardUuids: cards,
        suggestionUuids: [],
        cardSuggestionUuids: cards.map(() => []),
        cardRules: cards.map(() => ({ ruleId: 'rule-a', overrideReasons: [BENEFIT] })),
      });
    });
    await Promise.all(calls.map((c) => s.saveInvocation(c)));
    const report = await s.feedbackSummary(WINDOW);
    expect(report.rows.map((r) => [r.ruleId, r.shown])).to.deep.equal([['rule-a', 12_000]]);
  });

  it("keeps each card's rule, pack version and offered codes on its link, and an override's code in clear only when its card offered it", async () => {
    const s = env.stores.store('acme');
    await s.saveInvocation(twoRules('inv-1'));
    await s.saveInvocation(invocation('inv-2')); // no rules given
    await s.saveFeedback(
      [
        overriding('c1-inv-1', { ...offered(BENEFIT), userComment: PLANTED_COMMENT }),
        overriding(
          'c1-inv-1',
          { reason: { system: 'urn:ehr', code: PLANTED_CODE } },
          '2025-01-01T13:01:00Z',
        ),
        overriding('c2-inv-1', offered(BENEFIT)), // rule-b offered none
        overriding('card-inv-2', offered(BENEFIT)), // not known what it offered
      ],
      { service: SERVICE },
    );
    const raw = await env.raw('acme');
    expect(
      await raw.query(
        `SELECT card_uuid, rule_id, pack_id, pack_version, override_codes
         FROM ${raw.t('invocation_cards')} ORDER BY card_uuid`,
      ),
    ).to.deep.equal([
      {
        card_uuid: 'c1-inv-1',
        rule_id: 'rule-a',
        pack_id: 'medication-safety',
        pack_version: '1.2.0',
        override_codes: JSON.stringify([BENEFIT, DECLINED]),
      },
      {
        card_uuid: 'c2-inv-1',
        rule_id: 'rule-b',
        pack_id: 'medication-safety',
        pack_version: '1.2.0',
        override_codes: null,
      },
      {
        card_uuid: 'card-inv-2',
        rule_id: null,
        pack_id: 'medication-safety',
        pack_version: '1.2.0',
        override_codes: null,
      },
    ]);
    const codes = await raw.query<{ reason_code: string | null }>(
      `SELECT reason_code FROM ${raw.t('feedback')} ORDER BY seq`,
    );
    expect(codes.map((r) => r.reason_code)).to.deep.equal([BENEFIT, null, null, null]);
    if (backend === 'sqlite') {
      await env.stores.close();
      for (const planted of [PLANTED_CODE, PLANTED_COMMENT, 'Benefit outweighs risk']) {
        expect(filesContaining(env.dataDir, planted), planted).to.deep.equal([]);
      }
    }
  });

  it('counts per pack, version and rule from clear columns only: right with a provider that refuses every key', async () => {
    const s = env.stores.store('acme');
    await s.saveInvocation(twoRules('inv-1'));
    await s.saveInvocation(twoRules('inv-2'));
    await s.saveInvocation(
      twoRules('inv-3', {
        pack: { id: 'medication-safety', version: '1.3.0', hash: 'b'.repeat(64) },
      }),
    );
    await s.saveInvocation(twoRules('inv-99999')); // outside the window (next day)
    await s.saveFeedback(
      [
        overriding('c1-inv-1', offered(BENEFIT)),
        overriding('c1-inv-1', offered(DECLINED), '2025-01-01T13:02:00Z'),
        overriding('c1-inv-2', { userComment: PLANTED_COMMENT }),
        accepting('c2-inv-1'),
        overriding('c1-inv-99999', offered(BENEFIT)),
      ],
      { service: SERVICE },
    );
    await env.stores.close();
    const refusing = refusingProvider(env);
    const stores = await env.reopen({ keyProvider: refusing.provider });
    const report = await stores.store('acme').feedbackSummary(WINDOW);
    expect(refusing.unwraps()).to.equal(0);
    expect(report).to.deep.equal({
      tenant: 'acme',
      since: '2025-01-01T00:00:00.000Z',
      until: '2025-01-02T00:00:00.000Z',
      rows: [
        {
          packId: 'medication-safety',
          packVersion: '1.2.0',
          ruleId: 'rule-a',
          shown: 2,
          accepted: 0,
          overridden: 2,
          overrideRate: 1,
          reasons: { [BENEFIT]: 1, [DECLINED]: 1 },
        },
        {
          packId: 'medication-safety',
          packVersion: '1.2.0',
          ruleId: 'rule-b',
          shown: 2,
          accepted: 1,
          overridden: 0,
          overrideRate: 0,
          reasons: {},
        },
        {
          packId: 'medication-safety',
          packVersion: '1.3.0',
          ruleId: 'rule-a',
          shown: 1,
          accepted: 0,
          overridden: 0,
          overrideRate: null,
          reasons: {},
        },
        {
          packId: 'medication-safety',
          packVersion: '1.3.0',
          ruleId: 'rule-b',
          shown: 1,
          accepted: 0,
          overridden: 0,
          overrideRate: null,
          reasons: {},
        },
      ],
    });
    // Opening a record needs the key: refused, which shows the report never asked for one.
    await rejection(stores.store('acme').readInvocation('inv-1'));
    expect(refusing.unwraps()).to.be.greaterThan(0);
  });

  it('refuses bad windows and card rules naming the field, reports no store as no cards (creating none), and keeps only printable system|code reasons', async () => {
    const s = env.stores.store('acme');
    for (const [query, field] of [
      [{ since: 'yesterday' }, 'since'],
      [{ until: 'soon' }, 'until'],
      [{ since: '2025-01-02T00:00:00Z', until: '2025-01-01T00:00:00Z' }, 'since'],
      [{ since: '2025-01-01T00:00:00Z', until: '2025-01-01T00:00:00Z' }, 'since'],
    ] as const) {
      const err = asInstance(await rejection(s.feedbackSummary(query)), InvalidInputError);
      expect(err.field).to.equal(field);
    }
    expect((await s.feedbackSummary(WINDOW)).rows).to.deep.equal([]);
    expect(await env.stores.listTenants()).to.deep.equal([]);
    const bad: Array<[string, NewInvocation['cardRules']]> = [
      ['one rule for two cards', [{ ruleId: 'rule-a' }]],
      ['a rule id with a space', [{ ruleId: 'rule a' }, { ruleId: 'rule-b' }]],
      [
        'reasons that are not an array of strings',
        [{ ruleId: 'r', overrideReasons: [7] as unknown as string[] }, { ruleId: 'b' }],
      ],
    ];
    for (const [name, cardRules] of bad) {
      const err = asInstance(
        await rejection(s.saveInvocation(twoRules('x', { cardRules }))),
        InvalidInputError,
      );
      expect(err.field, name).to.match(/^cardRules/);
    }
    expect(await env.stores.listTenants()).to.deep.equal([]);
    // A pack's odd reason codes are left out, never a refused call: only system|code is kept.
    await s.saveInvocation(
      twoRules('inv-1', {
        cardRules: [
          { ruleId: 'rule-a', overrideReasons: ['benefit', 'urn:x|a\nb', '|x', BENEFIT, BENEFIT] },
          { ruleId: 'rule-b', overrideReasons: [] },
        ],
      }),
    );
    const raw = await env.raw('acme');
    expect(
      await raw.query(`SELECT override_codes FROM ${raw.t('invocation_cards')} ORDER BY card_uuid`),
    ).to.deep.equal([{ override_codes: JSON.stringify([BENEFIT]) }, { override_codes: null }]);
  });

  it('an older store is upgraded when opened: its cards count as rule unknown (null) under their pack version, new ones under their rule', async () => {
    const s = env.stores.store('acme');
    await s.saveInvocation(twoRules('inv-1'));
    await s.saveFeedback([overriding('c1-inv-1', offered(BENEFIT))], { service: SERVICE });
    await env.stores.close();
    const raw = await env.raw('acme');
    await downgradeToSchema5(raw);

    const stores = await env.reopen();
    const again = stores.store('acme');
    const old = await again.feedbackSummary(WINDOW);
    expect(old.rows).to.deep.equal([
      {
        packId: 'medication-safety',
        packVersion: '1.2.0',
        ruleId: null,
        shown: 2,
        accepted: 0,
        overridden: 1,
        overrideRate: 1,
        reasons: {}, // its reason was never stored in clear
      },
    ]);
    const [schema] = await raw.query<{ value: string }>(
      `SELECT value FROM ${raw.t('meta')} WHERE key = 'schema'`,
    );
    expect(schema?.value).to.equal('6');
    await again.saveInvocation(twoRules('inv-2'));
    await again.saveFeedback([overriding('c1-inv-2', offered(BENEFIT))], { service: SERVICE });
    const rows = (await again.feedbackSummary(WINDOW)).rows;
    expect(rows.map((r) => [r.ruleId, r.shown, r.overridden, r.reasons])).to.deep.equal([
      ['rule-a', 1, 1, { [BENEFIT]: 1 }],
      ['rule-b', 1, 0, {}],
      [null, 2, 1, {}],
    ]);
    // The old record still opens, feedback and all.
    expect((await again.readInvocation('inv-1')).feedback).to.have.length(1);
  });

  it('a tenant migrated to another region keeps its report (rules, versions and reason codes travel)', async () => {
    const dst = await makeEnv(backend, { region: 'us-east' });
    try {
      const s = env.stores.store('acme');
      await s.saveInvocation(twoRules('inv-1'));
      await s.saveFeedback([overriding('c1-inv-1', offered(BENEFIT)), accepting('c2-inv-1')], {
        service: SERVICE,
      });
      const before = await s.feedbackSummary(WINDOW);
      expect(before.rows.map((r) => r.ruleId)).to.deep.equal(['rule-a', 'rule-b']);
      await env.stores.close();
      await dst.stores.close();
      const source = await env.reopen();
      const target = await dst.reopen();
      const done = await migrateTenant({
        tenant: 'acme',
        source: { stores: source, keyProvider: env.provider },
        target: { stores: target, keyProvider: dst.provider },
        stateDir: path.join(dst.dir, 'migrations'),
        actor: 'platform-operator:spec',
        commit: () => Promise.resolve(),
      });
      expect(done.phase).to.equal('done');
      expect(await target.store('acme').feedbackSummary(WINDOW)).to.deep.equal(before);
      // An offered code reached the target as written: an override still counts under it.
      await target.store('acme').saveInvocation(twoRules('inv-2'));
      await target
        .store('acme')
        .saveFeedback([overriding('c1-inv-2', offered(DECLINED))], { service: SERVICE });
      const after = await target.store('acme').feedbackSummary(WINDOW);
      expect(after.rows[0]?.reasons).to.deep.equal({ [BENEFIT]: 1, [DECLINED]: 1 });
    } finally {
      await dst.close();
    }
  });

  it('a backup from before schema 6 restores and counts as rule unknown; a current one keeps the rules; a purge drops the links', async () => {
    const s = env.stores.store('acme');
    await s.saveInvocation(twoRules('inv-1'));
    await s.saveFeedback([overriding('c1-inv-1', offered(BENEFIT))], { service: SERVICE });
    const current = await env.stores.backupTenant('acme', env.backupDir);
    const older = await env.stores.backupTenant('acme', env.backupDir);
    // What the previous version wrote: no schema 6 columns or fields, schema 5.
    if (backend === 'sqlite') {
      const db = new Sequelize({
        dialect: 'sqlite',
        storage: path.join(older.path, 'store.sqlite'),
        logging: false,
      });
      for (const column of ['rule_id', 'pack_id', 'pack_version', 'override_codes']) {
        await db.query(`ALTER TABLE invocation_cards DROP COLUMN ${column}`);
      }
      await db.query('ALTER TABLE invocations DROP COLUMN card_rules');
      await db.query('ALTER TABLE feedback DROP COLUMN reason_code');
      await db.query(`UPDATE meta SET value = '5' WHERE key = 'schema'`);
      await db.query('VACUUM');
      await db.close();
      fixChecksum(older.path, 'store.sqlite');
    } else {
      const file = path.join(older.path, 'store.json');
      const dump = JSON.parse(fs.readFileSync(file, 'utf8')) as {
        tables: Record<string, Array<Record<string, unknown>>>;
      };
      for (const row of dump.tables.invocation_cards ?? []) {
        delete row.ruleId;
        delete row.packId;
        delete row.packVersion;
        delete row.overrideCodes;
      }
      for (const row of dump.tables.invocations ?? []) {
        delete row.cardRules;
      }
      for (const row of dump.tables.feedback ?? []) {
        delete row.reasonCode;
      }
      for (const row of dump.tables.meta ?? []) {
        if (row.key === 'schema') {
          row.value = '5';
        }
      }
      fs.writeFileSync(file, JSON.stringify(dump));
      fixChecksum(older.path, 'store.json');
    }
    await resign(env.provider, older.path);

    await env.stores.restoreTenant(older.path, { tenant: 'acme' });
    const restored = env.stores.store('acme');
    expect(
      (await restored.feedbackSummary(WINDOW)).rows.map((r) => [r.ruleId, r.shown, r.overridden]),
    ).to.deep.equal([[null, 2, 1]]);
    expect((await restored.readInvocation('inv-1')).feedback).to.have.length(1);

    await env.stores.restoreTenant(current.path, { tenant: 'acme' });
    const back = env.stores.store('acme');
    expect(
      (await back.feedbackSummary(WINDOW)).rows.map((r) => [
        r.ruleId,
        r.shown,
        r.overridden,
        r.reasons,
      ]),
    ).to.deep.equal([
      ['rule-a', 1, 1, { [BENEFIT]: 1 }],
      ['rule-b', 1, 0, {}],
    ]);

    const purged = await back.purgeRecords({ before: '2025-01-02T00:00:00Z' });
    expect(purged).to.include({ invocations: 1, feedback: 1 });
    expect((await back.feedbackSummary(WINDOW)).rows).to.deep.equal([]);
    const raw = await env.raw('acme');
    expect(await raw.query(`SELECT card_uuid FROM ${raw.t('invocation_cards')}`)).to.deep.equal([]);
  });
});
