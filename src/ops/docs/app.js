// silt docs: renders window.SILT_DOCS (written by `silt docs`) as a table list, a dag
// (Cytoscape.js) and per-table pages; clicking a column shows its upstream and downstream
// columns, in a list and as a graph. No network: everything is in this folder.
(function () {
  "use strict";
  var data = window.SILT_DOCS;
  var byTable = {};
  var columns = {};   // "layer.table.column" -> { table, column }
  var readers = {};   // "layer.table.column" -> [{ id, kind }]
  data.tables.forEach(function (t) {
    byTable[t.table] = t;
    t.columns.forEach(function (c) {
      var id = t.table + "." + c.name;
      columns[id] = { table: t, column: c };
      c.deps.forEach(function (d) {
        var from = d.table + "." + d.column;
        (readers[from] = readers[from] || []).push({ id: id, kind: d.kind });
      });
    });
  });

  function el(tag, attrs, children) {
    var e = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) {
      if (k === "text") { e.textContent = attrs[k]; }
      else if (k === "cls") { e.className = attrs[k]; }
      else { e.setAttribute(k, attrs[k]); }
    });
    (children || []).forEach(function (c) { if (c) { e.appendChild(c); } });
    return e;
  }
  function txt(s) { return document.createTextNode(s); }
  function badge(text, cls) { return el("span", { cls: "badge " + (cls || ""), text: text }); }

  document.getElementById("project").textContent = data.project + " — silt docs";
  document.getElementById("generated").textContent = "generated " + data.generated_at;

  // The table list, by layer.
  var nav = document.getElementById("tables");
  ["bronze", "silver", "gold"].forEach(function (layer) {
    var ts = data.tables.filter(function (t) { return t.layer === layer; });
    if (!ts.length) { return; }
    nav.appendChild(el("h3", { text: layer }));
    var ul = el("ul");
    ts.forEach(function (t) {
      var a = el("a", { href: "#t=" + t.table, cls: "table-link", "data-table": t.table, text: t.table.split(".")[1] });
      ul.appendChild(el("li", {}, [a]));
    });
    nav.appendChild(ul);
  });
  document.getElementById("filter").addEventListener("input", function (ev) {
    var q = ev.target.value.toLowerCase();
    Array.prototype.forEach.call(document.querySelectorAll(".table-link"), function (a) {
      a.parentNode.hidden = q && a.getAttribute("data-table").toLowerCase().indexOf(q) < 0;
    });
  });

  // The graph.
  var style = [
    { selector: "node", style: { "label": "data(label)", "font-size": 10, "text-valign": "bottom", "text-margin-y": 3, "width": 18, "height": 18, "background-color": "#8a96a3" } },
    { selector: "node.bronze", style: { "background-color": "#b87333" } },
    { selector: "node.silver", style: { "background-color": "#8a96a3" } },
    { selector: "node.gold", style: { "background-color": "#c9a227" } },
    { selector: "node.focus", style: { "border-width": 3, "border-color": "#0b5cad" } },
    { selector: "node.pii", style: { "shape": "diamond" } },
    { selector: "edge", style: { "width": 1.5, "line-color": "#b8c2cc", "target-arrow-color": "#b8c2cc", "target-arrow-shape": "triangle", "curve-style": "bezier" } },
    { selector: "edge.filter", style: { "line-style": "dashed" } },
    { selector: "edge[label]", style: { "label": "data(label)", "font-size": 8, "color": "#5f6b76", "text-rotation": "autorotate" } }
  ];
  var cy = cytoscape({ container: document.getElementById("graph"), style: style, wheelSensitivity: 0.3 });
  var mode = "dag";

  function showDag(focus) {
    mode = "dag";
    document.getElementById("graph-title").textContent = "Model dag";
    var els = [];
    data.tables.forEach(function (t) {
      els.push({ group: "nodes", data: { id: t.table, label: t.table }, classes: t.layer + (t.table === focus ? " focus" : "") });
    });
    data.tables.forEach(function (t) {
      t.upstream.forEach(function (u) {
        if (byTable[u]) { els.push({ group: "edges", data: { id: u + "->" + t.table, source: u, target: t.table } }); }
      });
    });
    cy.elements().remove();
    cy.add(els);
    cy.layout({ name: "breadthfirst", directed: true, spacingFactor: 1.1, padding: 10 }).run();
  }

  // A column's upstream (through data and key columns) and downstream, as sets of edges.
  function closure(id) {
    var nodes = {}, edges = {};
    nodes[id] = true;
    var up = [id];
    while (up.length) {
      var c = up.pop(), info = columns[c];
      if (!info) { continue; }
      info.column.deps.forEach(function (d) {
        var from = d.table + "." + d.column;
        edges[from + "->" + c] = { source: from, target: c, kind: d.kind };
        if (!nodes[from]) { nodes[from] = true; if (d.kind !== "filter") { up.push(from); } }
      });
    }
    var down = [id], seen = {};
    while (down.length) {
      var x = down.pop();
      (readers[x] || []).forEach(function (r) {
        edges[x + "->" + r.id] = { source: x, target: r.id, kind: r.kind };
        nodes[r.id] = true;
        if (!seen[r.id]) { seen[r.id] = true; down.push(r.id); }
      });
    }
    return { nodes: Object.keys(nodes), edges: Object.keys(edges).map(function (k) { return edges[k]; }) };
  }

  function showColumnGraph(id) {
    mode = "column";
    document.getElementById("graph-title").textContent = "Lineage of " + id;
    var c = closure(id), els = [];
    c.nodes.forEach(function (n) {
      var info = columns[n], layer = n.split(".")[0];
      var pii = info && info.column.pii && !info.column.pseudonymized;
      els.push({ group: "nodes", data: { id: n, label: n }, classes: layer + (n === id ? " focus" : "") + (pii ? " pii" : "") });
    });
    c.edges.forEach(function (e) {
      els.push({ group: "edges", data: { id: e.source + "->" + e.target, source: e.source, target: e.target, label: e.kind }, classes: e.kind });
    });
    cy.elements().remove();
    cy.add(els);
    cy.layout({ name: "breadthfirst", directed: true, spacingFactor: 1.2, padding: 10 }).run();
  }

  cy.on("tap", "node", function (ev) {
    var id = ev.target.id();
    if (mode === "dag") { location.hash = "#t=" + id; }
    else if (columns[id]) { location.hash = "#c=" + id; }
  });
  document.getElementById("show-dag").addEventListener("click", function () { showDag(); });

  function depItem(d) {
    var id = d.table + "." + d.column;
    return el("li", {}, [columnButton(id), txt(" "), el("span", { cls: "kind", text: d.kind === "filter" ? "filter/key" : d.kind })]);
  }
  function columnButton(id) {
    var b = el("button", { type: "button", cls: "column-link", "data-column": id, text: id });
    b.addEventListener("click", function () { location.hash = "#c=" + id; });
    return b;
  }

  // The upstream tree (data columns followed, keys listed) and the downstream list.
  function upstreamTree(id, depth, seen) {
    var info = columns[id], ul = el("ul");
    if (!info || depth > 30) { return ul; }
    if (info.table.landing && info.column.landing_field) {
      ul.appendChild(el("li", {}, [el("span", { cls: "kind", text: "landing " + info.table.landing + ": " + info.column.landing_field })]));
    }
    info.column.deps.forEach(function (d) {
      var li = depItem(d), from = d.table + "." + d.column;
      if (d.kind !== "filter" && !seen[from]) { seen[from] = true; li.appendChild(upstreamTree(from, depth + 1, seen)); }
      ul.appendChild(li);
    });
    return ul;
  }

  function showColumn(id) {
    var info = columns[id];
    var box = document.getElementById("lineage");
    box.hidden = false;
    box.textContent = "";
    if (!info) { box.appendChild(el("p", { cls: "error", text: "no column " + id })); return; }
    showTable(info.table.table, true);
    box.appendChild(el("h3", { text: "Lineage of " + id }));
    var tags = el("p");
    tags.appendChild(badge(info.column.data_type));
    if (info.column.pii) { tags.appendChild(badge("PII", "pii")); }
    if (info.column.pseudonymized) { tags.appendChild(badge("pseudonymized: " + info.column.pseudonymized, "pseudo")); }
    if (info.column.description) { tags.appendChild(txt(" " + info.column.description)); }
    box.appendChild(tags);
    var up = el("div", { id: "upstream" }, [el("h4", { text: "Upstream" })]);
    var tree = upstreamTree(id, 0, {});
    up.appendChild(tree.childNodes.length ? tree : el("p", { text: "none: a source column" }));
    box.appendChild(up);
    var down = el("div", { id: "downstream" }, [el("h4", { text: "Downstream" })]);
    var c = closure(id), ul = el("ul");
    c.edges.forEach(function (e) {
      if (c.nodes.indexOf(e.target) >= 0 && isDownstream(id, e.target)) {
        ul.appendChild(el("li", {}, [columnButton(e.target), txt(" "), el("span", { cls: "kind", text: "reads " + e.source + " (" + (e.kind === "filter" ? "filter/key" : e.kind) + ")" })]));
      }
    });
    down.appendChild(ul.childNodes.length ? ul : el("p", { text: "nothing reads it" }));
    box.appendChild(down);
    showColumnGraph(id);
  }
  function isDownstream(from, to) {
    var stack = [from], seen = {};
    while (stack.length) {
      var x = stack.pop();
      var rs = readers[x] || [];
      for (var i = 0; i < rs.length; i++) {
        if (rs[i].id === to) { return true; }
        if (!seen[rs[i].id]) { seen[rs[i].id] = true; stack.push(rs[i].id); }
      }
    }
    return false;
  }

  function showTable(name, keepLineage) {
    var t = byTable[name];
    var art = document.getElementById("table");
    art.textContent = "";
    if (!keepLineage) { document.getElementById("lineage").hidden = true; }
    Array.prototype.forEach.call(document.querySelectorAll(".table-link"), function (a) {
      a.classList.toggle("active", a.getAttribute("data-table") === name);
    });
    if (!t) { art.appendChild(el("p", { cls: "error", text: "no table " + name })); return; }
    art.appendChild(el("h2", { text: t.table }));
    var head = el("p");
    head.appendChild(badge(t.kind));
    head.appendChild(txt(" " + t.file));
    art.appendChild(head);
    if (t.description) { art.appendChild(el("p", { cls: "description", text: t.description })); }
    if (t.error) { art.appendChild(el("p", { cls: "error", text: t.error })); }
    var dl = el("dl", { cls: "stats" });
    function stat(k, v) { dl.appendChild(el("dt", { text: k })); dl.appendChild(el("dd", { text: v })); }
    if (t.stats) {
      stat("version", String(t.stats.version));
      stat("rows", String(t.stats.rows));
      stat("files", String(t.stats.files) + " (" + t.stats.bytes + " bytes)");
      if (t.stats.partition_by.length) { stat("partitioned by", t.stats.partition_by.join(", ")); }
    } else {
      stat("in the lake", "not built yet");
    }
    if (t.landing) { stat("landing", t.landing); }
    if (t.freshness) {
      stat("freshness", t.freshness.status + (t.freshness.age ? " (newest " + t.freshness.age + " old)" : "") +
        (t.freshness.warn_after ? ", warn after " + t.freshness.warn_after : "") +
        (t.freshness.error_after ? ", error after " + t.freshness.error_after : ""));
    }
    if (t.upstream.length) { stat("reads", t.upstream.join(", ")); }
    art.appendChild(dl);

    art.appendChild(el("h3", { text: "Columns" }));
    var tbl = el("table", { cls: "cols" });
    tbl.appendChild(el("tr", {}, ["column", "type", "", "description", "from"].map(function (h) { return el("th", { text: h }); })));
    t.columns.forEach(function (c) {
      var marks = el("td");
      if (c.pii) { marks.appendChild(badge("PII", "pii")); }
      if (c.pseudonymized) { marks.appendChild(badge(c.pseudonymized, "pseudo")); }
      var from = el("td");
      c.deps.filter(function (d) { return d.kind !== "filter"; }).forEach(function (d, i) {
        if (i) { from.appendChild(txt(", ")); }
        from.appendChild(txt(d.table + "." + d.column));
      });
      if (c.landing_field) { from.appendChild(txt("landing: " + c.landing_field)); }
      tbl.appendChild(el("tr", {}, [el("td", {}, [columnButton(t.table + "." + c.name)]), el("td", { text: c.data_type }), marks, el("td", { text: c.description || "" }), from]));
    });
    art.appendChild(tbl);

    art.appendChild(el("h3", { text: "Tests" }));
    if (t.tests.length) {
      var tt = el("table", { cls: "cols tests" });
      tt.appendChild(el("tr", {}, ["test", "severity", "last result", "when"].map(function (h) { return el("th", { text: h }); })));
      t.tests.forEach(function (x) {
        var res = el("td");
        res.appendChild(x.status ? badge(x.status + (x.failing_rows ? " (" + x.failing_rows + " rows)" : ""), x.status) : txt("not run yet"));
        tt.appendChild(el("tr", {}, [el("td", { text: x.name }), el("td", { text: x.severity }), res, el("td", { text: x.tested_at || "" })]));
      });
      art.appendChild(tt);
    } else {
      art.appendChild(el("p", { text: "No tests declared." }));
    }
    if (t.sql) {
      art.appendChild(el("h3", { text: "SQL" }));
      art.appendChild(el("pre", { cls: "sql", text: t.sql }));
    }
    if (!keepLineage) { showDag(name); }
  }

  function route() {
    var h = decodeURIComponent(location.hash.replace(/^#/, ""));
    if (h.indexOf("c=") === 0) { showColumn(h.slice(2)); }
    else if (h.indexOf("t=") === 0) { showTable(h.slice(2)); }
    else { showDag(); }
  }
  window.addEventListener("hashchange", route);
  window.siltDocs = { showColumn: showColumn, showTable: showTable, showDag: showDag };
  route();
})();
