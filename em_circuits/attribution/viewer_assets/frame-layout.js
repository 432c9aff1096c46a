// Loaded before circuit-tracer's scripts on its graph pages. Two fixes for narrow windows (a
// pane of the side-by-side page is under half a screen):
// * circuit-tracer's grid puts the graph in 8 of 14 columns beside the node panels; below
//   WIDE_PX the graph and the node panel take the full width, one above the other (a layout
//   the user saved with the graph, qParams.gridsnap, is kept);
// * the prompt's token labels under the graph are drawn at every position, overlapping when
//   positions are close; only labels at least MIN_LABEL_GAP_PX apart are kept, counted from
//   the last position (the one the graph explains).
(function () {
  'use strict'
  var WIDE_PX = 1100
  var MIN_LABEL_GAP_PX = 18  // 12 px text rotated by 45 degrees needs about 17 px
  // Graph on top at full width; the clicked node's inputs and outputs below it at full width
  // (two columns of node names); the feature's details and the subgraph side by side last.
  var STACKED = {
    'link-graph': {x: 0, y: 0, w: 14, h: 9},
    'node-connections': {x: 0, y: 9, w: 14, h: 6},
    'feature-detail': {x: 0, y: 15, w: 8, h: 6},
    'subgraph': {x: 8, y: 15, w: 6, h: 6},
  }

  var initGridsnap
  Object.defineProperty(window, 'initGridsnap', {
    configurable: true,
    get: function () { return initGridsnap },
    set: function (fn) {
      initGridsnap = function (options) {
        var sel = options && options.sel
        var width = sel && sel.node() ? sel.node().offsetWidth : window.innerWidth
        if (options && !options.serializedGrid && width < WIDE_PX) {
          options.gridData.forEach(function (item) {
            if (STACKED[item.class]) item.cur = Object.assign({}, STACKED[item.class])
          })
        }
        return fn.apply(this, arguments)
      }
    },
  })

  function tickX(g) {
    var match = /translate\(\s*([-\d.e]+)/.exec(g.getAttribute('transform') || '')
    return match ? +match[1] : null
  }

  function thinTokenLabels() {
    var ticks = Array.prototype.slice.call(document.querySelectorAll('g.prompt-token'))
      .filter(function (g) { return g.querySelector('text') && tickX(g) !== null })
      .sort(function (a, b) { return tickX(b) - tickX(a) })  // from the last position
    var lastKept = null
    ticks.forEach(function (g) {
      var x = tickX(g)
      var keep = lastKept === null || lastKept - x >= MIN_LABEL_GAP_PX
      var text = g.querySelector('text')
      text.style.display = keep ? '' : 'none'
      text.setAttribute('data-thinned', keep ? '0' : '1')
      if (keep) lastKept = x
    })
  }

  var queued = false
  new MutationObserver(function () {
    if (queued) return
    queued = true
    requestAnimationFrame(function () { queued = false; thinTokenLabels() })
  }).observe(document, {childList: true, subtree: true})
})()
