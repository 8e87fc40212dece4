// CDS Hooks 2.0 card rendering, shared by the playground and the SMART app.
// Every string from a card goes into the DOM as text, except `detail`, which is GitHub-flavoured
// markdown: raw HTML in it is shown as text (escaped by the renderer), and the HTML marked
// produces is sanitised by DOMPurify (an allowlist, returned as a DOM fragment, never innerHTML).
// The page's Content-Security-Policy (script-src 'self') is a second wall behind both.
import { Marked } from '/ui/vendor/marked.js';
import DOMPurify from '/ui/vendor/purify.js';

const INDICATORS = {
  critical: { label: 'Critical', shape: 'octagon' },
  warning: { label: 'Warning', shape: 'triangle' },
  info: { label: 'Info', shape: 'circle' },
};

const ALLOWED_TAGS = [
  'p',
  'br',
  'strong',
  'em',
  'b',
  'i',
  'del',
  's',
  'code',
  'pre',
  'blockquote',
  'hr',
  'ul',
  'ol',
  'li',
  'a',
  'h1',
  'h2',
  'h3',
  'h4',
  'h5',
  'h6',
  'table',
  'thead',
  'tbody',
  'tr',
  'th',
  'td',
];

function escapeHtml(text) {
  return String(text)
    .replaceAll('&', '&amp;')
    .replaceAll('<', '&lt;')
    .replaceAll('>', '&gt;')
    .replaceAll('"', '&quot;')
    .replaceAll("'", '&#39;');
}

const markdown = new Marked({
  gfm: true,
  async: false,
  renderer: {
    // Raw HTML blocks and inline tags are displayed, never interpreted.
    html({ text }) {
      return escapeHtml(text);
    },
  },
});

/** True for an absolute http(s) URL (what a card may link to or load). */
export function isHttpUrl(value) {
  try {
    const url = new URL(value);
    return url.protocol === 'https:' || url.protocol === 'http:';
  } catch {
    return false;
  }
}

DOMPurify.addHook('afterSanitizeAttributes', (node) => {
  if (node.tagName === 'A') {
    const href = node.getAttribute('href');
    if (href === null || !isHttpUrl(href)) {
      node.removeAttribute('href');
      return;
    }
    node.setAttribute('target', '_blank');
    node.setAttribute('rel', 'noopener noreferrer');
  }
});

/** Sanitised DOM for a markdown string. */
export function renderMarkdown(text) {
  const html = markdown.parse(String(text));
  return DOMPurify.sanitize(html, {
    ALLOWED_TAGS,
    ALLOWED_ATTR: ['href', 'title'],
    ALLOW_DATA_ATTR: false,
    ALLOW_ARIA_ATTR: false,
    RETURN_DOM_FRAGMENT: true,
  });
}

/** Builds an element: attributes are set as attributes, children as nodes or text. */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) {
      continue;
    }
    if (key === 'class') {
      el.className = value;
    } else if (key.startsWith('on') && typeof value === 'function') {
      el.addEventListener(key.slice(2), value);
    } else {
      el.setAttribute(key, value === true ? '' : String(value));
    }
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) {
      continue;
    }
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

const SVG = 'http://www.w3.org/2000/svg';

function svg(tag, attrs) {
  const el = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) {
    el.setAttribute(k, String(v));
  }
  return el;
}

/** The indicator icon: a distinct shape per level, so colour is never the only cue. */
function indicatorIcon(shape) {
  const root = svg('svg', {
    viewBox: '0 0 20 20',
    width: 18,
    height: 18,
    'aria-hidden': 'true',
    focusable: 'false',
    class: 'icon',
  });
  if (shape === 'octagon') {
    root.append(
      svg('polygon', { points: '6,1 14,1 19,6 19,14 14,19 6,19 1,14 1,6', class: 'icon-fill' }),
    );
    root.append(svg('rect', { x: 9, y: 5, width: 2, height: 7, class: 'icon-mark' }));
    root.append(svg('rect', { x: 9, y: 13.5, width: 2, height: 2, class: 'icon-mark' }));
  } else if (shape === 'triangle') {
    root.append(svg('polygon', { points: '10,1 19,18 1,18', class: 'icon-fill' }));
    root.append(svg('rect', { x: 9, y: 7, width: 2, height: 6, class: 'icon-mark' }));
    root.append(svg('rect', { x: 9, y: 14, width: 2, height: 2, class: 'icon-mark' }));
  } else {
    root.append(svg('circle', { cx: 10, cy: 10, r: 9, class: 'icon-fill' }));
    root.append(svg('rect', { x: 9, y: 8, width: 2, height: 7, class: 'icon-mark' }));
    root.append(svg('rect', { x: 9, y: 4.5, width: 2, height: 2, class: 'icon-mark' }));
  }
  return root;
}

function indicatorOf(card) {
  return INDICATORS[card.indicator] ? card.indicator : 'info';
}

function sourceBlock(source) {
  if (!source || typeof source.label !== 'string') {
    return null;
  }
  const label = isHttpUrl(source.url)
    ? h(
        'a',
        { href: source.url, target: '_blank', rel: 'noopener noreferrer' },
        source.label,
        h('span', { class: 'visually-hidden' }, ' (opens in a new tab)'),
      )
    : h('span', {}, source.label);
  const icon = isHttpUrl(source.icon)
    ? h('img', {
        src: source.icon,
        alt: '',
        width: 20,
        height: 20,
        class: 'source-icon',
        referrerpolicy: 'no-referrer',
      })
    : null;
  return h('p', { class: 'card-source' }, icon, h('span', { class: 'muted' }, 'Source: '), label);
}

function linksBlock(links) {
  if (!Array.isArray(links) || links.length === 0) {
    return null;
  }
  const items = links.map((link) => {
    if (!isHttpUrl(link.url)) {
      return h('li', {}, link.label);
    }
    if (link.type === 'smart') {
      // A SMART link is an app to launch: the EHR supplies its launch context.
      return h(
        'li',
        {},
        h(
          'a',
          {
            href: link.url,
            target: '_blank',
            rel: 'noopener noreferrer',
            class: 'smart-link',
            'data-app-context': link.appContext,
          },
          h('span', { class: 'tag' }, 'SMART app'),
          ' Launch ',
          link.label,
          h('span', { class: 'visually-hidden' }, ' (opens in a new tab)'),
        ),
      );
    }
    return h(
      'li',
      {},
      h(
        'a',
        { href: link.url, target: '_blank', rel: 'noopener noreferrer' },
        link.label,
        h('span', { class: 'visually-hidden' }, ' (opens in a new tab)'),
      ),
    );
  });
  return h('div', { class: 'card-links' }, h('h4', {}, 'Links'), h('ul', {}, items));
}

const ACTION_VERBS = { create: 'Create', update: 'Update', delete: 'Delete' };

/**
 * Renders one card. `ctx.sendFeedback(card, item)` posts one feedback item and resolves (or
 * rejects with an Error whose message is shown).
 */
export function renderCard(card, ctx, index = 0) {
  const level = indicatorOf(card);
  const { label, shape } = INDICATORS[level];
  const baseId = `${ctx.idPrefix ?? 'card'}-${index}`;
  const status = h('p', { class: 'card-status', role: 'status', 'aria-live': 'polite' });
  const controls = [];
  let done = false;

  const setBusy = (busy) => {
    for (const c of controls) {
      if (!c.dataset.locked) {
        c.disabled = busy;
      }
    }
  };

  async function post(item, onSuccess) {
    setBusy(true);
    status.textContent = 'Sending feedback…';
    try {
      await ctx.sendFeedback(card, item);
      onSuccess();
    } catch (err) {
      status.textContent = `Feedback could not be sent: ${err.message}`;
      status.classList.add('error');
      setBusy(false);
    }
  }

  const article = h('article', {
    class: `card card-${level}`,
    'aria-labelledby': `${baseId}-summary`,
    'data-indicator': level,
    'data-card-uuid': card.uuid,
  });
  const head = h(
    'div',
    { class: 'card-head' },
    h(
      'span',
      { class: `indicator indicator-${level}` },
      indicatorIcon(shape),
      h('span', { class: 'indicator-text' }, label),
    ),
    h('h3', { id: `${baseId}-summary`, class: 'card-summary' }, card.summary),
  );
  article.append(head);

  if (typeof card.detail === 'string' && card.detail !== '') {
    const detail = h('div', { class: 'card-detail' });
    detail.append(renderMarkdown(card.detail));
    article.append(detail);
  }
  const source = sourceBlock(card.source);
  if (source) {
    article.append(source);
  }
  const links = linksBlock(card.links);
  if (links) {
    article.append(links);
  }

  const suggestions = Array.isArray(card.suggestions) ? card.suggestions : [];
  if (suggestions.length > 0) {
    const behavior = card.selectionBehavior === 'any' ? 'any' : 'at-most-one';
    const hint =
      behavior === 'any' ? 'Choose any of these suggestions.' : 'Choose at most one suggestion.';
    const group = h(
      'div',
      { class: 'card-suggestions', role: 'group', 'aria-labelledby': `${baseId}-sugg` },
      h('h4', { id: `${baseId}-sugg` }, 'Suggestions ', h('span', { class: 'muted small' }, hint)),
    );
    const buttons = [];
    suggestions.forEach((s, i) => {
      const actionsId = `${baseId}-s${i}-actions`;
      const actions =
        Array.isArray(s.actions) && s.actions.length > 0
          ? h(
              'ul',
              { class: 'actions', id: actionsId },
              s.actions.map((a) =>
                h(
                  'li',
                  {},
                  h('span', { class: 'action-type' }, `${ACTION_VERBS[a.type] ?? a.type}:`),
                  ' ',
                  a.description,
                ),
              ),
            )
          : null;
      const button = h(
        'button',
        {
          type: 'button',
          class: s.isRecommended ? 'suggestion recommended' : 'suggestion',
          'aria-pressed': 'false',
          'aria-describedby': actions ? actionsId : undefined,
          'data-suggestion-uuid': s.uuid,
        },
        s.label,
        s.isRecommended ? h('span', { class: 'tag tag-recommended' }, 'Recommended') : null,
      );
      button.addEventListener('click', () => {
        if (done || button.getAttribute('aria-pressed') === 'true') {
          return;
        }
        const item = {
          card: card.uuid,
          outcome: 'accepted',
          acceptedSuggestions: [{ id: s.uuid }],
          outcomeTimestamp: new Date().toISOString(),
        };
        void post(item, () => {
          button.setAttribute('aria-pressed', 'true');
          button.dataset.locked = '1';
          button.disabled = true;
          status.classList.remove('error');
          status.textContent = `Accepted: ${s.label}. Feedback sent.`;
          if (behavior === 'at-most-one') {
            done = true;
            for (const c of controls) {
              c.dataset.locked = '1';
              c.disabled = true;
            }
          } else {
            setBusy(false);
          }
        });
      });
      buttons.push(button);
      controls.push(button);
      group.append(h('div', { class: 'suggestion-row' }, button, actions));
    });
    article.append(group);
  }

  // Override: the card's own reasons (CDS Hooks 2.0 overrideReasons) and a free comment.
  const reasons = Array.isArray(card.overrideReasons) ? card.overrideReasons : [];
  const reasonId = `${baseId}-reason`;
  const commentId = `${baseId}-comment`;
  const reasonSelect =
    reasons.length > 0
      ? h(
          'select',
          { id: reasonId },
          h('option', { value: '' }, 'Choose a reason…'),
          reasons.map((r, i) => h('option', { value: String(i) }, r.display ?? r.code)),
        )
      : null;
  const comment = h('textarea', { id: commentId, rows: 2, maxlength: 1000 });
  const overrideButton = h('button', { type: 'submit', class: 'secondary' }, 'Override card');
  controls.push(overrideButton, comment);
  if (reasonSelect) {
    controls.push(reasonSelect);
  }
  const form = h(
    'form',
    { class: 'override-form' },
    reasonSelect ? h('label', { for: reasonId }, 'Reason') : null,
    reasonSelect,
    h('label', { for: commentId }, 'Comment (optional)'),
    comment,
    overrideButton,
  );
  form.addEventListener('submit', (event) => {
    event.preventDefault();
    if (done) {
      return;
    }
    const reason =
      reasonSelect && reasonSelect.value !== '' ? reasons[Number(reasonSelect.value)] : undefined;
    const text = comment.value.trim();
    const overrideReason = {};
    if (reason) {
      overrideReason.reason = {
        system: reason.system,
        code: reason.code,
        ...(reason.display ? { display: reason.display } : {}),
      };
    }
    if (text !== '') {
      overrideReason.userComment = text;
    }
    const item = {
      card: card.uuid,
      outcome: 'overridden',
      ...(Object.keys(overrideReason).length > 0 ? { overrideReason } : {}),
      outcomeTimestamp: new Date().toISOString(),
    };
    void post(item, () => {
      done = true;
      for (const c of controls) {
        c.dataset.locked = '1';
        c.disabled = true;
      }
      status.classList.remove('error');
      status.textContent = `Overridden${reason ? `: ${reason.display ?? reason.code}` : ''}. Feedback sent.`;
      article.classList.add('card-overridden');
    });
  });
  article.append(h('details', { class: 'card-override' }, h('summary', {}, 'Override…'), form));
  article.append(status);
  return article;
}

/** Replaces `container`'s content with the cards (critical first, as EHRs order them). */
export function renderCards(container, cards, ctx) {
  container.replaceChildren();
  if (!Array.isArray(cards) || cards.length === 0) {
    container.append(h('p', { class: 'empty' }, ctx.emptyText ?? 'No cards: nothing to show.'));
    return;
  }
  const rank = { critical: 0, warning: 1, info: 2 };
  const ordered = cards
    .map((card, i) => ({ card, i }))
    .sort((a, b) => rank[indicatorOf(a.card)] - rank[indicatorOf(b.card)] || a.i - b.i);
  const list = h('div', { class: 'card-list' });
  ordered.forEach(({ card }, i) => list.append(renderCard(card, ctx, i)));
  container.append(list);
}
