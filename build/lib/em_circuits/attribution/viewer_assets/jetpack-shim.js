// Offline stand-in for the "jetpack" d3 helpers that circuit-tracer's frontend loads from
// transformer-circuits.pub. Written for this project on top of d3 v7; it implements only what
// the frontend calls (found by grepping circuit_tracer/frontend/assets):
//   selection: append / insert / selectAppend with "tag.class#id" names, appendMany, at, st,
//              translate, parent
//   d3:        conventions (with layers and drawAxis), nestBy, clamp, attachTooltip
// The npm package d3-jetpack is not a drop-in: its browser build replaces window.d3, its nestBy
// needs d3-collection (gone in d3 v6) and its event handlers use the pre-v6 d3.event.
(function (d3) {
  'use strict'
  if (!d3 || !d3.selection) throw new Error('jetpack-shim.js: load d3 v7 first')

  var proto = d3.selection.prototype
  var nativeAppend = proto.append
  var nativeInsert = proto.insert

  // "g.node.pinned#n1" -> {tag: "g", classes: ["node", "pinned"], id: "n1"}
  function parseName(name) {
    var parsed = {tag: name.match(/^[^.#]*/)[0], classes: [], id: null}
    var part = /([.#])([^.#]+)/g
    var m
    while ((m = part.exec(name))) {
      if (m[1] === '.') parsed.classes.push(m[2])
      else parsed.id = m[2]
    }
    return parsed
  }

  // Creates the element in its parent's namespace (svg stays svg), as d3's own append does.
  function create(parent, parsed, args) {
    var el = d3.creator(parsed.tag).apply(parent, args)
    if (parsed.classes.length) el.setAttribute('class', parsed.classes.join(' '))
    if (parsed.id) el.setAttribute('id', parsed.id)
    return el
  }

  proto.append = function (name) {
    if (typeof name !== 'string') return nativeAppend.call(this, name)
    var parsed = parseName(name)
    return this.select(function () {
      return this.appendChild(create(this, parsed, arguments))
    })
  }

  proto.insert = function (name, before) {
    if (typeof name !== 'string') return nativeInsert.call(this, name, before)
    var parsed = parseName(name)
    var where = before == null ? function () { return null }
      : typeof before === 'function' ? before : d3.selector(before)
    return this.select(function () {
      return this.insertBefore(create(this, parsed, arguments), where.apply(this, arguments) || null)
    })
  }

  // The first descendant matching name, appended if there is none (idempotent re-renders).
  proto.selectAppend = function (name) {
    var parsed = parseName(name)
    return this.select(function () {
      return this.querySelector(name) || this.appendChild(create(this, parsed, arguments))
    })
  }

  proto.appendMany = function (name, data) {
    return this.selectAll(null).data(data).enter().append(name)
  }

  // The distinct parents of the selected elements, carrying the children's data.
  proto.parent = function () {
    var seen = new Set()
    return this.filter(function () {
      if (seen.has(this.parentNode)) return false
      seen.add(this.parentNode)
      return true
    }).select(function () { return this.parentNode })
  }

  // SVG attributes whose names really are camelCase; every other camelCase key is kebab-cased.
  var CAMEL_ATTRS = new Set(('viewBox preserveAspectRatio gradientUnits gradientTransform ' +
    'patternUnits patternContentUnits patternTransform markerWidth markerHeight markerUnits ' +
    'refX refY clipPathUnits maskUnits maskContentUnits filterUnits primitiveUnits ' +
    'stdDeviation textLength lengthAdjust startOffset pathLength spreadMethod').split(' '))

  function kebab(key) {
    return key.replace(/([a-z\d])([A-Z])/g, '$1-$2').toLowerCase()
  }

  function setEach(sel, obj, setOne) {
    Object.keys(obj).forEach(function (key) { setOne(sel, key, obj[key]) })
    return sel
  }

  function at(name, value) {
    if (typeof name === 'object') {
      return setEach(this, name, function (sel, key, v) {
        sel.attr(CAMEL_ATTRS.has(key) ? key : kebab(key), v)
      })
    }
    return arguments.length === 1 ? this.attr(name) : this.attr(name, value)
  }

  // CSS properties for which a bare number means pixels (st({width: 10}) -> "10px").
  var PX_STYLES = new Set(('width height min-width max-width min-height max-height top right ' +
    'bottom left margin margin-top margin-right margin-bottom margin-left padding padding-top ' +
    'padding-right padding-bottom padding-left font-size line-height border-width ' +
    'border-radius gap row-gap column-gap letter-spacing flex-basis outline-width ' +
    'text-indent').split(' '))

  function withPx(prop, value) {
    if (!PX_STYLES.has(prop)) return value
    var px = function (v) { return typeof v === 'number' ? v + 'px' : v }
    if (typeof value !== 'function') return px(value)
    return function () { return px(value.apply(this, arguments)) }
  }

  function st(name, value) {
    if (typeof name === 'object') {
      return setEach(this, name, function (sel, key, v) {
        var prop = kebab(key)
        sel.style(prop, withPx(prop, v))
      })
    }
    if (arguments.length === 1) return this.style(name)
    var prop = kebab(name)
    return this.style(prop, withPx(prop, value))
  }

  // translate([x, y]) or translate(fn); translate(v, 0|1) moves along x or y only.
  // SVG elements get a transform attribute, HTML elements a CSS transform.
  function translate(xy, dim) {
    var node = this.node()
    if (!node) return this
    function point(args, self) {
      var p = typeof xy === 'function' ? xy.apply(self, args) : xy
      return dim === 0 ? [p, 0] : dim === 1 ? [0, p] : p
    }
    if (typeof node.getBBox === 'function') {
      return this.attr('transform', function () {
        var p = point(arguments, this)
        return 'translate(' + p[0] + ',' + p[1] + ')'
      })
    }
    return this.style('transform', function () {
      var p = point(arguments, this)
      return 'translate(' + p[0] + 'px,' + p[1] + 'px)'
    })
  }

  proto.at = at
  proto.st = st
  proto.translate = translate
  if (d3.transition) {
    d3.transition.prototype.at = at
    d3.transition.prototype.st = st
    d3.transition.prototype.translate = translate
  }

  d3.clamp = function (min, value, max) {
    return Math.max(min, Math.min(max, value))
  }

  // Groups in order of first appearance; each group is an array with a string .key.
  d3.nestBy = function (array, key) {
    var keyFn = typeof key === 'function' ? key : function (d) { return d[key] }
    var groups = new Map()
    array.forEach(function (d, i) {
      var k = String(keyFn(d, i))
      if (!groups.has(k)) {
        var group = []
        group.key = k
        groups.set(k, group)
      }
      groups.get(k).push(d)
    })
    return Array.from(groups.values())
  }

  // Chart scaffolding: margins, x/y scales and axes, and stacked layers over one container.
  // layers is a string of s (svg <g> inside the margins), c (2d canvas context, translated by the
  // margins) and d (absolutely positioned div); c.layers holds them in order.
  d3.conventions = function (c) {
    c = c || {}
    c.margin = Object.assign({top: 20, right: 20, bottom: 20, left: 20}, c.margin)
    c.sel = c.sel || c.parentSel || d3.select('body')
    var node = c.sel.node()
    c.totalWidth = c.totalWidth || (node && node.offsetWidth) || 960
    c.totalHeight = c.totalHeight || (node && node.offsetHeight) || 500
    c.width = c.width || c.totalWidth - c.margin.left - c.margin.right
    c.height = c.height || c.totalHeight - c.margin.top - c.margin.bottom
    c.totalWidth = c.width + c.margin.left + c.margin.right
    c.totalHeight = c.height + c.margin.top + c.margin.bottom
    c.sel.st({position: 'relative', width: c.totalWidth, height: c.totalHeight})

    c.x = c.x || d3.scaleLinear().range([0, c.width])
    c.y = c.y || d3.scaleLinear().range([c.height, 0])
    c.xAxis = c.xAxis || d3.axisBottom(c.x)
    c.yAxis = c.yAxis || d3.axisLeft(c.y)

    c.layers = (c.layers || 's').split('').map(function (type) {
      return addLayer(c, type)
    })

    // Reads c.xAxis / c.yAxis when called, so callers may replace the scales and axes first.
    c.drawAxis = function (svg) {
      svg = svg || c.svg
      var xAxisSel = svg.append('g.x.axis').translate([0, c.height]).call(c.xAxis)
      var yAxisSel = svg.append('g.y.axis').call(c.yAxis)
      return {xAxisSel: xAxisSel, yAxisSel: yAxisSel}
    }
    return c
  }

  function addLayer(c, type) {
    if (type === 's') {
      var svg = c.sel.append('svg')
        .at({width: c.totalWidth, height: c.totalHeight})
        .st({position: 'absolute', left: 0, top: 0})
        .append('g').translate([c.margin.left, c.margin.top])
      if (!c.svg) c.svg = svg
      return svg
    }
    if (type === 'c') {
      var scale = window.devicePixelRatio || 1
      var ctx = c.sel.append('canvas')
        .at({width: c.totalWidth * scale, height: c.totalHeight * scale})
        .st({position: 'absolute', left: 0, top: 0, width: c.totalWidth, height: c.totalHeight})
        .node().getContext('2d')
      ctx.scale(scale, scale)
      ctx.translate(c.margin.left, c.margin.top)
      return ctx
    }
    if (type === 'd') {
      return c.sel.append('div').st({
        position: 'absolute', left: c.margin.left, top: c.margin.top,
        width: c.width, height: c.height,
      })
    }
    throw new Error('d3.conventions: unknown layer type ' + type)
  }

  // Shows fieldFns(d) in tooltipSel while the pointer is over an element of sel.
  d3.attachTooltip = function (sel, tooltipSel, fieldFns) {
    if (!sel.size()) return
    tooltipSel = tooltipSel || d3.select('.tooltip')
    if (!fieldFns) {
      var first = sel.datum() || {}
      fieldFns = Object.keys(first)
        .filter(function (k) { return typeof first[k] !== 'object' })
        .map(function (k) { return function (d) { return k + ': <b>' + d[k] + '</b>' } })
    }
    sel
      .on('mouseover.attachTooltip', function (ev, d) {
        tooltipSel.classed('tooltip-hidden', false).html('')
          .appendMany('div', fieldFns).html(function (fn) { return fn(d) })
        d3.select(this).classed('tooltipped', true)
      })
      .on('mousemove.attachTooltip', function (ev) {
        var node = tooltipSel.node()
        if (!node) return
        var bb = node.getBoundingClientRect()
        var left = d3.clamp(20, ev.clientX - bb.width / 2, window.innerWidth - bb.width - 20)
        var top = window.innerHeight > ev.clientY + 20 + bb.height
          ? ev.clientY + 20 : ev.clientY - bb.height - 20
        tooltipSel.style('left', left + 'px').style('top', top + 'px')
      })
      .on('mouseout.attachTooltip', function () {
        tooltipSel.classed('tooltip-hidden', true)
        d3.selectAll('.tooltipped').classed('tooltipped', false)
      })
  }
})(window.d3)
