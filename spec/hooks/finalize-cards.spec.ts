import { expect } from 'chai';
import fc from 'fast-check';
import { finalizeCards, stripEmpty } from '../../hooks/index.ts';
import { shortenSummary } from '../../rules/index.ts';
import type { RawCard, TraceEntry } from '../../rules/index.ts';

function raw(patch: Partial<RawCard> = {}): RawCard {
  return {
    ruleId: 'rule-1',
    summary: 'Potassium is high',
    indicator: 'warning',
    source: { label: 'cellcds medication safety' },
    ...patch,
  };
}

function counter(): () => string {
  let n = 0;
  return () => `00000000-0000-4000-8000-${String(++n).padStart(12, '0')}`;
}

describe('hooks: stripEmpty', () => {
  it('removes null, "", [] and {} members deeply, bottom-up', () => {
    expect(
      stripEmpty({
        a: null,
        b: '',
        c: [],
        d: {},
        e: { f: null, g: [{}, null, ''] },
        h: [1, null, '', 'x', { i: '' }],
        j: 0,
        k: false,
        l: 'kept',
      }),
    ).to.deep.equal({ h: [1, 'x'], j: 0, k: false, l: 'kept' });
  });

  it('returns the top-level value even when it ends up empty', () => {
    expect(stripEmpty({ cards: [] })).to.deep.equal({});
    expect(stripEmpty([])).to.deep.equal([]);
    expect(stripEmpty('x')).to.equal('x');
  });

  it('never leaves an empty member, whatever the JSON (property)', () => {
    const hasEmpty = (v: unknown, top: boolean): boolean => {
      if (!top && (v === null || v === '' || (Array.isArray(v) && v.length === 0))) {
        return true;
      }
      if (Array.isArray(v)) {
        return v.some((x) => hasEmpty(x, false));
      }
      if (typeof v === 'object' && v !== null) {
        const values = Object.values(v);
        return (!top && values.length === 0) || values.some((x) => hasEmpty(x, false));
      }
      return false;
    };
    fc.assert(
      fc.property(fc.jsonValue(), (value) => {
        const stripped = stripEmpty(value);
        expect(hasEmpty(stripped, true)).to.equal(false);
        // Idempotent.
        expect(stripEmpty(stripped)).to.deep.equal(stripped);
      }),
    );
  });

  it('equals a plain entries/fromEntries walk, key order included (property)', () => {
    const reference = (v: unknown): unknown => {
      const empty = (x: unknown) =>
        x === null ||
        x === undefined ||
        x === '' ||
        (Array.isArray(x) && x.length === 0) ||
        (typeof x === 'object' && !Array.isArray(x) && Object.keys(x).length === 0);
      if (Array.isArray(v)) {
        return v.map(reference).filter((x) => !empty(x));
      }
      if (typeof v === 'object' && v !== null) {
        return Object.fromEntries(
          Object.entries(v)
            .map(([k, x]) => [k, reference(x)] as const)
            .filter(([, x]) => !empty(x)),
        );
      }
      return v;
    };
    fc.assert(
      fc.property(fc.jsonValue(), (value) => {
        const stripped = stripEmpty(value);
        expect(JSON.stringify(stripped)).to.equal(JSON.stringify(reference(value)));
      }),
    );
  });

  it('copies a "__proto__" member as a member, never as the prototype', () => {
    const value = JSON.parse('{"a":{"__proto__":{"polluted":true},"b":1}}') as unknown;
    const stripped = stripEmpty(value) as { a: Record<string, unknown> };
    expect(Object.getPrototypeOf(stripped.a)).to.equal(Object.prototype);
    expect(Object.keys(stripped.a)).to.deep.equal(['__proto__', 'b']);
    expect(JSON.stringify(stripped)).to.equal('{"a":{"__proto__":{"polluted":true},"b":1}}');
    expect(({} as Record<string, unknown>).polluted).to.equal(undefined);
  });
});

describe('hooks: finalizeCards', () => {
  it('gives every card and suggestion a fresh uuid and drops ruleId', () => {
    const rawCards = [
      raw({ suggestions: [{ label: 'A' }, { label: 'B' }] }),
      raw({ ruleId: 'rule-2', suggestions: [{ label: 'C' }] }),
    ];
    const first = finalizeCards(rawCards);
    const second = finalizeCards(rawCards);
    const ids = (cards: typeof first): string[] =>
      cards.flatMap((c) => [c.uuid, ...(c.suggestions ?? []).map((s) => s.uuid)]);
    expect(new Set(ids(first)).size).to.equal(5);
    expect(ids(first).some((id) => ids(second).includes(id))).to.equal(false);
    for (const card of first) {
      expect(card).to.not.have.property('ruleId');
    }
  });

  it('uses the injected uuid source in card, then suggestion order', () => {
    const [card] = finalizeCards([raw({ suggestions: [{ label: 'A' }] })], counter());
    expect(card!.suggestions![0]!.uuid).to.equal('00000000-0000-4000-8000-000000000001');
    expect(card!.uuid).to.equal('00000000-0000-4000-8000-000000000002');
  });

  it('defaults selectionBehavior to at-most-one with suggestions, keeps any, drops it without', () => {
    expect(finalizeCards([raw({ suggestions: [{ label: 'A' }] })])[0]!.selectionBehavior).to.equal(
      'at-most-one',
    );
    expect(
      finalizeCards([raw({ selectionBehavior: 'any', suggestions: [{ label: 'A' }] })])[0]!
        .selectionBehavior,
    ).to.equal('any');
    const none = finalizeCards([raw({ selectionBehavior: 'any', suggestions: [] })])[0]!;
    expect(none).to.not.have.property('suggestions');
    expect(none).to.not.have.property('selectionBehavior');
  });

  it('strips null and empty optional fields deeply', () => {
    const [card] = finalizeCards([
      {
        ...raw(),
        detail: '',
        links: [],
        overrideReasons: [],
        source: { label: 'L', url: '', icon: null, topic: {} },
        suggestions: [{ label: 'A', isRecommended: null, actions: [] }],
      } as unknown as RawCard,
    ]);
    expect(card).to.deep.equal({
      uuid: card!.uuid,
      summary: 'Potassium is high',
      indicator: 'warning',
      source: { label: 'L' },
      suggestions: [{ label: 'A', uuid: card!.suggestions![0]!.uuid }],
      selectionBehavior: 'at-most-one',
    });
  });

  it('keeps FHIR resources in actions intact except for nulls', () => {
    const resource = {
      resourceType: 'MedicationRequest',
      id: 'rx1',
      status: 'draft',
      note: null,
      dosageInstruction: [{ text: 'daily', timing: null }],
      extension: [],
      _status: { extension: [{ url: 'http://example.org/x', valueString: 'v' }] },
    };
    const [card] = finalizeCards([
      raw({
        suggestions: [
          { label: 'A', actions: [{ type: 'create', description: 'Order it', resource }] },
        ],
      }),
    ]);
    expect(card!.suggestions![0]!.actions![0]).to.deep.equal({
      type: 'create',
      description: 'Order it',
      resource: {
        resourceType: 'MedicationRequest',
        id: 'rx1',
        status: 'draft',
        dosageInstruction: [{ text: 'daily' }],
        extension: [],
        _status: { extension: [{ url: 'http://example.org/x', valueString: 'v' }] },
      },
    });
    // The engine's card is not modified.
    expect(resource.note).to.equal(null);
  });

  const broken: Array<[string, RawCard]> = [
    ['an empty summary', raw({ summary: '' })],
    ['indicator hard-stop', raw({ indicator: 'hard-stop' as never })],
    ['no source', { ...raw(), source: undefined } as unknown as RawCard],
    ['an empty source.label', raw({ source: { label: '' } })],
    ['a relative source.icon', raw({ source: { label: 'L', icon: '/icon.png' } })],
    [
      'an override reason without display',
      raw({ overrideReasons: [{ system: 'http://s', code: 'c' }] }),
    ],
    ['a link without type', raw({ links: [{ label: 'L', url: 'https://x.org' } as never] })],
    ['a relative link url', raw({ links: [{ label: 'L', url: '/x', type: 'absolute' }] })],
    [
      'appContext on an absolute link',
      raw({ links: [{ label: 'L', url: 'https://x.org', type: 'absolute', appContext: '{}' }] }),
    ],
    [
      'two recommended suggestions under at-most-one',
      raw({
        suggestions: [
          { label: 'A', isRecommended: true },
          { label: 'B', isRecommended: true },
        ],
      }),
    ],
    ['a suggestion without label', raw({ suggestions: [{ label: '' }] })],
    [
      'an action without description',
      raw({
        suggestions: [
          {
            label: 'A',
            actions: [{ type: 'delete', description: '', resourceId: 'ServiceRequest/1' }],
          },
        ],
      }),
    ],
    [
      'a delete whose resourceId has no id (Type/)',
      raw({
        suggestions: [
          {
            label: 'A',
            actions: [{ type: 'delete', description: 'D', resourceId: 'MedicationRequest/' }],
          },
        ],
      }),
    ],
    [
      'a resourceId that is not Type/id',
      raw({
        suggestions: [
          {
            label: 'A',
            actions: [{ type: 'delete', description: 'D', resourceId: 'MedicationRequest/a b' }],
          },
        ],
      }),
    ],
    [
      'a create whose subject.reference has no id (Patient/)',
      raw({
        suggestions: [
          {
            label: 'A',
            actions: [
              {
                type: 'create',
                description: 'C',
                resource: { resourceType: 'ServiceRequest', subject: { reference: 'Patient/' } },
              },
            ],
          },
        ],
      }),
    ],
    [
      'an update whose basedOn[0].reference is Type/ followed by a space',
      raw({
        suggestions: [
          {
            label: 'A',
            actions: [
              {
                type: 'update',
                description: 'U',
                resource: {
                  resourceType: 'MedicationRequest',
                  id: 'mr1',
                  basedOn: [{ reference: 'ServiceRequest/ ' }],
                },
              },
            ],
          },
        ],
      }),
    ],
    [
      'a delete without resourceId',
      raw({
        suggestions: [{ label: 'A', actions: [{ type: 'delete', description: 'D' }] }],
      }),
    ],
    [
      'selectionBehavior all',
      raw({ selectionBehavior: 'all' as never, suggestions: [{ label: 'A' }] }),
    ],
  ];
  for (const [name, card] of broken) {
    it(`throws on ${name} (a bug upstream)`, () => {
      expect(() => finalizeCards([raw(), card])).to.throw(Error, /^card\[1\]/);
    });
  }

  it('shortens a summary of 140+ characters as the engine does, instead of refusing the cards', () => {
    const long = `Warfarin + ${'a'.repeat(150)}: increased risk of bleeding`;
    const cards = finalizeCards([raw(), raw({ ruleId: 'rule-2', summary: long })]);
    expect(cards).to.have.length(2);
    expect(cards[1]!.summary).to.equal(shortenSummary(long));
    expect(cards[1]!.summary).to.have.length(139);
    expect(cards[1]!.summary.endsWith('…')).to.equal(true);
    expect(cards[1]!.summary.startsWith('Warfarin + aaa')).to.equal(true);
    expect(cards[0]!.summary).to.equal('Potassium is high');
    expect(finalizeCards([raw({ summary: 'x'.repeat(140) })])[0]!.summary).to.have.length(139);
  });

  it('never leaves a summary of 140+ code units, nor half a surrogate pair (property)', () => {
    fc.assert(
      fc.property(fc.string({ unit: 'binary', minLength: 140, maxLength: 400 }), (summary) => {
        const [card] = finalizeCards([raw({ summary })]);
        expect(card!.summary.length).to.be.below(140);
        expect(card!.summary).to.equal(shortenSummary(summary));
        const last = card!.summary.charCodeAt(card!.summary.length - 2);
        expect(last >= 0xd800 && last <= 0xdbff).to.equal(false);
      }),
    );
  });

  it("notes a shortened summary in its rule's trace entry, as the engine does", () => {
    const trace: TraceEntry[] = [
      { ruleId: 'rule-1', status: 'fired', fired: true, durationMs: 1 },
      {
        ruleId: 'rule-2',
        status: 'fired',
        fired: true,
        durationMs: 1,
        error: 'suggestion dropped: x',
      },
      { ruleId: 'rule-3', status: 'fired', fired: true, durationMs: 1 },
    ];
    finalizeCards(
      [
        raw({ summary: 'y'.repeat(150) }),
        raw({ ruleId: 'rule-2', summary: 'z'.repeat(141) }),
        raw({ ruleId: 'rule-3' }),
      ],
      counter(),
      trace,
    );
    const note = (n: number) =>
      `card.summary: ${n} characters, shortened to 139 before sending (must be under 140)`;
    expect(trace[0]!.error).to.equal(note(150));
    expect(trace[1]!.error).to.equal(`suggestion dropped: x; ${note(141)}`);
    expect(trace[2]).to.not.have.property('error');
  });

  it('accepts a summary of 139 characters and several recommended suggestions under any', () => {
    expect(() =>
      finalizeCards([
        raw({ summary: 'x'.repeat(139) }),
        raw({
          selectionBehavior: 'any',
          suggestions: [
            { label: 'A', isRecommended: true },
            { label: 'B', isRecommended: true },
          ],
        }),
      ]),
    ).to.not.throw();
  });
});
