import { expect } from 'chai';
import { HookRequestError, parseFeedbackRequest } from '../../hooks/index.ts';
import { loadExample } from './fixtures.ts';
import type { Json } from './fixtures.ts';

function item(patch: Json = {}): Json {
  return {
    card: '4e0a3a1e-3283-4575-ab82-028d55fe2719',
    outcome: 'accepted',
    acceptedSuggestions: [{ id: 'e56e1945-20b3-4393-8503-a1a20fd73152' }],
    outcomeTimestamp: '2021-12-11T10:05:31Z',
    ...patch,
  };
}

describe('hooks: parseFeedbackRequest', () => {
  for (const file of [
    '2.0/feedback-accepted.json',
    '2.0/feedback-overridden-no-reason.json',
    '2.0/feedback-overridden-with-reason.json',
  ]) {
    it(`parses the spec example ${file} unchanged`, () => {
      const body = loadExample(file);
      expect(parseFeedbackRequest(body)).to.deep.equal(body['feedback']);
    });
  }

  it('parses several items and drops unknown fields', () => {
    const items = parseFeedbackRequest({
      feedback: [
        item({ extension: { 'com.example.x': 1 } }),
        item({
          outcome: 'overridden',
          acceptedSuggestions: undefined,
          overrideReason: { userComment: 'n/a' },
        }),
      ],
    });
    expect(items).to.have.length(2);
    expect(items[0]).to.not.have.property('extension');
    expect(items[1]!.overrideReason).to.deep.equal({ userComment: 'n/a' });
  });

  it('accepts RFC 3339 offsets, fractions and a leap second', () => {
    for (const ts of [
      '2021-12-11T10:05:31.123Z',
      '2021-12-11t10:05:31+02:00',
      '2016-12-31T23:59:60Z',
      '2024-02-29T00:00:00-05:30',
    ]) {
      expect(
        () => parseFeedbackRequest({ feedback: [item({ outcomeTimestamp: ts })] }),
        ts,
      ).to.not.throw();
    }
  });

  const bad: Array<[string, unknown, string]> = [
    ['a body that is an array', [item()], 'body'],
    ['no feedback', {}, 'feedback'],
    ['feedback not an array', { feedback: item() }, 'feedback'],
    ['empty feedback', { feedback: [] }, 'feedback'],
    ['an item that is not an object', { feedback: ['x'] }, 'feedback[0]'],
    ['no card', { feedback: [item({ card: undefined })] }, 'feedback[0].card'],
    ['an empty card', { feedback: [item({ card: '' })] }, 'feedback[0].card'],
    [
      'outcome ignored',
      { feedback: [item(), item({ outcome: 'ignored' })] },
      'feedback[1].outcome',
    ],
    [
      'accepted without acceptedSuggestions',
      { feedback: [item({ acceptedSuggestions: undefined })] },
      'feedback[0].acceptedSuggestions',
    ],
    [
      'empty acceptedSuggestions',
      { feedback: [item({ acceptedSuggestions: [] })] },
      'feedback[0].acceptedSuggestions',
    ],
    [
      'a suggestion without id',
      { feedback: [item({ acceptedSuggestions: [{}] })] },
      'feedback[0].acceptedSuggestions[0].id',
    ],
    [
      'an empty overrideReason',
      { feedback: [item({ outcome: 'overridden', overrideReason: {} })] },
      'feedback[0].overrideReason',
    ],
    [
      'a reason without system',
      { feedback: [item({ outcome: 'overridden', overrideReason: { reason: { code: 'c' } } })] },
      'feedback[0].overrideReason.reason.system',
    ],
    [
      'a numeric userComment',
      { feedback: [item({ outcome: 'overridden', overrideReason: { userComment: 5 } })] },
      'feedback[0].overrideReason.userComment',
    ],
    [
      'no outcomeTimestamp',
      { feedback: [item({ outcomeTimestamp: undefined })] },
      'feedback[0].outcomeTimestamp',
    ],
    [
      'a date without time',
      { feedback: [item({ outcomeTimestamp: '2021-12-11' })] },
      'feedback[0].outcomeTimestamp',
    ],
    [
      'a time without zone',
      { feedback: [item({ outcomeTimestamp: '2021-12-11T10:05:31' })] },
      'feedback[0].outcomeTimestamp',
    ],
    [
      'the 30th of February',
      { feedback: [item({ outcomeTimestamp: '2021-02-30T10:05:31Z' })] },
      'feedback[0].outcomeTimestamp',
    ],
    [
      'hour 24',
      { feedback: [item({ outcomeTimestamp: '2021-12-11T24:00:00Z' })] },
      'feedback[0].outcomeTimestamp',
    ],
    [
      'free text',
      { feedback: [item({ outcomeTimestamp: 'yesterday' })] },
      'feedback[0].outcomeTimestamp',
    ],
    [
      'a __proto__ key',
      JSON.parse('{"feedback":[{"__proto__":{"x":1}}]}'),
      'feedback[0].__proto__',
    ],
  ];
  for (const [name, body, field] of bad) {
    it(`rejects ${name} (${field})`, () => {
      expect(() => parseFeedbackRequest(body))
        .to.throw(HookRequestError)
        .with.property('field', field);
    });
  }

  it('never echoes the user comment in an error', () => {
    const body = {
      feedback: [
        item({
          outcome: 'overridden',
          outcomeTimestamp: 'bad',
          overrideReason: { userComment: 'Patient PHI note' },
        }),
      ],
    };
    expect(() => parseFeedbackRequest(body))
      .to.throw(HookRequestError)
      .that.satisfies((e: Error) => !e.message.includes('PHI'));
  });
});
