// The index's table: sort by a column, filter by policy and object type. Nothing else.
"use strict";

(function () {
    const table = document.getElementById("findings");
    if (!table) {
        return;
    }
    const body = table.tBodies[0];

    function value(row, column, kind) {
        const cell = row.cells[column];
        const text = cell.dataset.value !== undefined ? cell.dataset.value : cell.textContent;
        return kind === "number" ? Number(text) : text.trim();
    }

    table.querySelectorAll("thead th").forEach(function (th, column) {
        th.querySelector("button").addEventListener("click", function () {
            const ascending = th.getAttribute("aria-sort") !== "ascending";
            table.querySelectorAll("thead th").forEach(function (other) {
                other.setAttribute("aria-sort", "none");
            });
            th.setAttribute("aria-sort", ascending ? "ascending" : "descending");
            const kind = th.dataset.sort;
            const rows = Array.from(body.rows);
            rows.sort(function (a, b) {
                const x = value(a, column, kind);
                const y = value(b, column, kind);
                const order = kind === "number" ? x - y : x.localeCompare(y, undefined, {numeric: true});
                return ascending ? order : -order;
            });
            rows.forEach(function (row) { body.appendChild(row); });
        });
    });

    const selects = Array.from(document.querySelectorAll("select[data-filter]"));
    function filter() {
        let shown = 0;
        Array.from(body.rows).forEach(function (row) {
            const match = selects.every(function (select) {
                return !select.value || row.dataset[select.dataset.filter] === select.value;
            });
            row.hidden = !match;
            shown += match ? 1 : 0;
        });
        document.getElementById("no-match").hidden = shown > 0;
    }
    selects.forEach(function (select) { select.addEventListener("change", filter); });
})();
